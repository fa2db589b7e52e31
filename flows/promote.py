"""promote, promote_environment and rollback: every move of `champion` a person starts.

`promote` moves `champion` within this environment under the policy in params.yaml,
optionally approved; `promote_environment` copies a version to the next environment
(dev -> staging -> prod) and makes it champion there, prod only with a reviewer's signed
approval (common.approvals); `rollback` walks `champion` back. Each acts on the shared model
(`tenant` None) or on one tenant's own model (`<MODEL_NAME>.<tenant>`).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, pause_flow_run, task
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.input import RunInput, create_flow_run_input
from prefect.runtime import flow_run

from common import approvals, paths, registry
from common.errors import UserError, run_cli
from common.params import load_params
from common.registry import environments, promotion, served
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


class SignedApproval(RunInput):
    """A reviewer's signed answer to a promotion across environments (`mlops approve`)."""

    reviewer: str
    decision: Literal["approve", "reject"]
    expires: str
    signature: str


@dataclass(frozen=True)
class Outcome:
    """What a promotion across environments did, in one line for people."""

    moved: bool
    message: str


@task
def plan_step(to: str, tenant: str | None, version: str | None) -> environments.Step:
    """The version that would move and where, checked (gate passed, champion)."""
    settings = get_settings()
    return environments.plan(
        registry.connect(settings), settings, to, tenant=tenant, version=version
    )


@task
def copy_and_move(
    step: environments.Step, by: str, reason: str, approval: dict[str, str]
) -> promotion.Move:
    """Copy the version's files into the target environment and make the copy champion."""
    settings = get_settings()
    client = registry.connect(settings)
    return environments.promote(client, settings, step, by=by, reason=reason, approval=approval)


def _await_approval(step: environments.Step, timeout: int) -> approvals.Answer | None:
    """Pause until a registered reviewer's valid signed answer arrives; None at the timeout.

    An answer that does not verify is refused and logged, and the run pauses again for the
    time left: only a signature can end the wait early.
    """
    logger = get_run_logger()
    settings = get_settings()
    request = approvals.Request(
        str(flow_run.id),
        step.source_env,
        step.source_model,
        step.source_version,
        step.target_env,
    )
    create_flow_run_input(key=approvals.REQUEST_KEY, value=asdict(request))
    if not approvals.load_reviewers(settings.reviewers_file):
        logger.warning(
            "no reviewer is registered in %s: nobody can approve (mlops reviewers add)",
            settings.reviewers_file,
        )
    logger.info(
        "%s needs a signed approval; waiting up to %d s: mlops approve %s --key <ed25519 key>",
        step.describe(),
        timeout,
        flow_run.id,
    )
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) >= 1:
        try:
            answer = pause_flow_run(
                wait_for_input=SignedApproval, timeout=int(left), poll_interval=2
            )
        except FlowPauseTimeout:
            return None
        signed = approvals.Answer(
            answer.reviewer, answer.decision, answer.expires, answer.signature
        )
        try:  # read again: a reviewer removed while the run waited no longer counts
            approvals.verify(approvals.load_reviewers(settings.reviewers_file), request, signed)
        except approvals.RefusedApprovalError as exc:
            logger.warning("refused an approval: %s; still waiting", exc)
            continue
        return signed
    return None


def _approval_tags(signed: approvals.Answer) -> dict[str, str]:
    return {
        tag.APPROVAL_REVIEWER: signed.reviewer,
        tag.APPROVAL_DECISION: signed.decision,
        tag.APPROVAL_EXPIRES: signed.expires,
        tag.APPROVAL_SIGNATURE: signed.signature,
        tag.APPROVAL_FLOW_RUN_ID: str(flow_run.id),
    }


@flow(name="promote_environment")
def promote_environment(
    to: str,
    tenant: str | None = None,
    version: str | None = None,
    project_dir: str = ".",
) -> Outcome:
    """Copy a version to environment `to` (staging: dev's champion whose gate passed; prod:
    staging's champion, with a registered reviewer's signed approval) and make it champion."""
    logger = get_run_logger()
    params = load_params(Path(project_dir) / "params.yaml").for_tenant(tenant).promote
    step = plan_step(to, tenant, version)
    by = _by(f"promote --to {step.target_env}")
    reason = f"{step.source_env} v{step.source_version} passed its gate; promoted to {to}"
    approval: dict[str, str] = {}
    if step.target_env == "prod" or params.require_approval:
        timeout = params.approval_timeout_seconds
        signed = _await_approval(step, timeout)
        if signed is None or signed.decision == approvals.REJECT:
            why = (
                f"no approval within {timeout} s"
                if signed is None
                else f"rejected by {signed.reviewer}"
            )
            return _report(Outcome(False, f"{step.describe()}: not promoted: {why}"))
        # what was approved must still be what may move (staging's champion may have moved)
        plan_step(to, tenant, step.source_version)
        approval = _approval_tags(signed)
        by = f"{signed.reviewer} (signed approval, prefect flow run {flow_run.id})"
        reason = f"approved by {signed.reviewer}; {reason}"
    move = copy_and_move(step, by, reason, approval)
    logger.info("%s", move.describe())
    return _report(
        Outcome(True, f"{step.describe()}: promoted as {move.name} v{move.version} (champion)")
    )


def _report(outcome: Outcome) -> Outcome:
    get_run_logger().info("%s", outcome.message)
    create_markdown_artifact(f"# {outcome.message}\n", key="promote-environment")
    return outcome


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
    """`python -m flows.promote rollback [--tenant acme]` (`make rollback`) and
    `python -m flows.promote promote --to staging|prod [--tenant acme] [--version N]`: run
    the flow here and say what moved, or that nothing did and why (one line, no traceback)."""
    parser = argparse.ArgumentParser(prog="python -m flows.promote", description=main.__doc__)
    parser.add_argument("command", choices=["rollback", "promote"])
    parser.add_argument("--tenant", default=None, help="a tenant's own model (default: shared)")
    parser.add_argument("--reason", default="manual rollback (make rollback)")
    parser.add_argument("--to", choices=["staging", "prod"], help="promote: the target environment")
    parser.add_argument("--version", default=None, help="promote to staging: this dev version")
    args = parser.parse_args(argv)
    if args.command == "promote":
        _promote_cli(args.to, args.tenant or None, args.version)
        return
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


def _promote_cli(to: str | None, tenant: str | None, version: str | None) -> None:
    if to is None:
        raise UserError("promote needs --to staging or --to prod")
    settings = get_settings()
    step = environments.plan(  # a UserError before any flow run
        registry.connect(settings), settings, to, tenant=tenant, version=version
    )
    print(f"promoting {step.describe()}")
    outcome = promote_environment(to=to, tenant=tenant, version=version)
    print(outcome.message)


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
