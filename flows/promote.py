"""promote and rollback: move `champion` under the policy in params.yaml, optionally approved.

Both act on the shared model (`tenant` None) or on one tenant's own model
(`<MODEL_NAME>.<tenant>`, judged on its own holdout under its own params).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, pause_flow_run, task
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.input import RunInput
from prefect.runtime import flow_run

from common import paths, registry
from common.params import load_params
from common.registry import served
from common.settings import get_settings
from models import promote as policy


class Approval(RunInput):
    """What the reviewer answers in the Prefect UI when the policy asks for approval."""

    approve: bool
    reviewer: str = "unknown"
    comment: str = ""


def _by(what: str) -> str:
    return f"{what} (prefect flow run {flow_run.id})" if flow_run.id else what


@task
def compare(
    project_dir: str, tenant: str | None = None
) -> tuple[policy.Candidates, policy.Verdict]:
    """Score challenger and champion on the same holdout and apply the policy."""
    root = Path(project_dir)
    params = load_params(root / "params.yaml").for_tenant(tenant)
    settings = get_settings()
    return policy.compare(
        registry.connect(settings),
        registry.model_name(settings, tenant),
        params.data,
        params.promote,
        cache=served.cache_dir(settings),
        holdout_path=root / paths.layout(tenant).HOLDOUT,
    )


@task
def decide(
    c: policy.Candidates, promoted: bool, by: str, reason: str, tenant: str | None = None
) -> None:
    """Record the decision on the challenger and move the alias if it was promoted."""
    client = registry.connect(get_settings())
    name = registry.model_name(get_settings(), tenant)
    if promoted:
        policy.promote(client, name, c, by=by, reason=reason)
    else:
        policy.reject(client, name, c, by=by, reason=reason)


def _ask(c: policy.Candidates, verdict: policy.Verdict, timeout: int) -> tuple[bool, str, str]:
    """Pause for a person; (approved, who, why). No answer in time is a rejection."""
    logger = get_run_logger()
    logger.info(
        "challenger v%s passed the policy (%s); waiting up to %d s for approval in the UI",
        c.challenger,
        verdict.summary,
        timeout,
    )
    try:
        answer = pause_flow_run(wait_for_input=Approval, timeout=timeout, poll_interval=2)
    except FlowPauseTimeout:
        return False, _by("approval timeout"), f"no approval within {timeout} s; {verdict.summary}"
    note = f": {answer.comment}" if answer.comment else ""
    verb = "approved" if answer.approve else "rejected"
    return (
        answer.approve,
        f"{answer.reviewer} (prefect UI)",
        f"{verb} by {answer.reviewer}{note}; {verdict.summary}",
    )


@flow(name="promote")
def promote(project_dir: str = ".", tenant: str | None = None) -> bool:
    """Promote `challenger` to `champion` if it passes the policy (and a person approves)."""
    params = load_params(Path(project_dir) / "params.yaml").for_tenant(tenant).promote
    c, verdict = compare(project_dir, tenant)
    promoted, by, reason = verdict.passed, _by("promote policy"), verdict.summary
    if promoted and params.require_approval:
        promoted, by, reason = _ask(c, verdict, params.approval_timeout_seconds)
    decide(c, promoted, by, reason, tenant)
    verb = "promoted to champion" if promoted else "not promoted"
    get_run_logger().info("challenger v%s %s: %s", c.challenger, verb, reason)
    create_markdown_artifact(
        f"# promote: v{c.challenger} {verb}\n\nDecided by {by}.\n\n{reason}\n",
        key="promote-decision",
    )
    return promoted


@flow(name="rollback")
def rollback(reason: str = "manual rollback", tenant: str | None = None) -> str:
    """Point `champion` of `tenant`'s model (None: the shared one) back at the version the
    current champion replaced."""
    settings = get_settings()
    name = registry.model_name(settings, tenant)
    old, new = policy.rollback(
        registry.connect(settings), name, by=_by("rollback flow"), reason=reason
    )
    get_run_logger().info("%s: champion moved back from v%s to v%s: %s", name, old, new, reason)
    return new
