"""promote and rollback: move `champion` under the policy in params.yaml, optionally approved.

Both act on the shared model (`tenant` None) or on one tenant's own model
(`<MODEL_NAME>.<tenant>`, judged on its own holdout under its own params).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, pause_flow_run, task
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.input import RunInput
from prefect.runtime import flow_run

from common import paths, registry
from common.errors import UserError, run_cli
from common.params import load_params
from common.registry import promotion, served
from common.registry import tags as tag
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
    c: policy.Candidates,
    promoted: bool,
    by: str,
    reason: str,
    *,
    tenant: str | None = None,
    evidence: dict[str, Any] | None = None,
) -> None:
    """Record the decision on the challenger and move the alias if it was promoted
    (through the one promotion path, `evidence` joining the scores)."""
    client = registry.connect(get_settings())
    name = registry.model_name(get_settings(), tenant)
    if promoted:
        policy.promote(client, name, c, by=by, reason=reason, extra=evidence)
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
    evidence = {
        "decided_in": "promote flow",
        "policy": params.model_dump(include={"improve", "no_worse", "require_approval"}),
        "verdict": verdict.summary,
    }
    decide(c, promoted, by, reason, tenant=tenant, evidence=evidence)
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
    current champion replaced; run again, it walks one further back."""
    settings = get_settings()
    name = registry.model_name(settings, tenant)
    old, new = policy.rollback(
        registry.connect(settings), name, by=_by("rollback flow"), reason=reason
    )
    get_run_logger().info("%s: champion moved back from v%s to v%s: %s", name, old, new, reason)
    return new


def main(argv: list[str] | None = None) -> None:
    """`python -m flows.promote rollback [--tenant acme]` (`make rollback`): run the rollback
    flow here and say what moved; no earlier champion is one line, not a traceback."""
    parser = argparse.ArgumentParser(prog="python -m flows.promote", description=main.__doc__)
    parser.add_argument("command", choices=["rollback"])
    parser.add_argument("--tenant", default=None, help="a tenant's own model (default: shared)")
    parser.add_argument("--reason", default="manual rollback (make rollback)")
    args = parser.parse_args(argv)
    settings = get_settings()
    name = registry.model_name(settings, args.tenant or None)
    client = registry.connect(settings)
    try:  # a UserError before any flow run
        old, target = promotion.rollback_target(client, name)
    except UserError as exc:
        if args.tenant:
            raise
        raise UserError(f"{exc}{_tenant_hint(client, name)}") from None
    print(f"{name}: rolling champion back from v{old} to v{target} ({args.reason})")
    rollback(reason=args.reason, tenant=args.tenant or None)
    now = registry.version_by_alias(client, name, registry.CHAMPION)
    moved = now is not None and str(now.version) == target
    tags = dict(now.tags) if now is not None else {}
    print(
        f"{name}: champion v{old} -> v{target}"
        if moved
        else f"{name}: champion is v{now.version if now else '(none)'}, not v{target}"
    )
    further = tags.get(promotion.PREVIOUS)
    print(
        f"  by {tags.get(tag.alias_tag(registry.CHAMPION, tag.ALIAS_SET_BY), '?')} at "
        f"{tags.get(tag.alias_tag(registry.CHAMPION, tag.ALIAS_SET_AT), '?')}; "
        + (f"the next rollback returns to v{further}" if further else "no earlier champion left")
    )
    if not moved:
        raise UserError(f"{name}: the rollback did not move champion to v{target}")


def _tenant_hint(client: MlflowClient, name: str) -> str:
    """Tenants' own models a rollback could move, when the shared one cannot (after `make
    demo`, acme's own v2 is the champion the register stage's gate promoted)."""
    movable = promotion.rollback_candidates(client, name)
    if not movable:
        return ""
    listed = ", ".join(
        f"{registry.tenant_of(get_settings(), n) or n} (v{old} -> v{to})"
        for n, (old, to) in movable.items()
    )
    first = registry.tenant_of(get_settings(), next(iter(movable)))
    return f"\nTenants' own models that can roll back: {listed}; e.g. make rollback TENANT={first}"


if __name__ == "__main__":
    run_cli(main)
