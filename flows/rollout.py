"""rollout: ramp `challenger` on live traffic, then promote it or roll it back automatically.

For each step of params.yaml `rollout.steps` (e.g. 10 -> 50 -> 100 percent) the flow sets
the challenger's share of traffic (`rollout.challenger_weight`), then reads both variants'
live numbers every `poll_seconds` (common.store.variants: the rollout's window, each
variant under its own version) until the step can be judged (models/rollout.py):
- worse by more than a margin (error rate, p95 latency; accuracy and ROC AUC, significantly,
  once labels arrive): roll back (weight 0, `challenger` removed, `promote.decision: rolled
  back` on it, an alert to MONITOR_WEBHOOK_URL naming the metric); champion never moves;
- no worse: the next step, and after the last one the promotion, through the one promotion
  path (`promotion.move_champion`, the live numbers as evidence), weight back to 0;
- not enough traffic within `step_timeout_seconds`: held (weight 0, the challenger kept,
  `promote.decision: held`): no version stays on traffic without a verdict, and none is
  condemned for want of traffic; run the flow again to start over.
Every judged step is recorded on the challenger (`rollout.step.<n>`), printed per variant,
and kept as a markdown artifact (`rollout-step`).

`tenant` None: the shared model and every tenant's traffic it served; a tenant id: its own
model (`<MODEL_NAME>.<tenant>`, params.yaml `tenants`), its rows, its `rollout` overrides.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from common import alerts, registry
from common.errors import run_cli
from common.localpg import prediction_db
from common.params import RolloutParams, load_params
from common.registry import CHALLENGER, CHAMPION
from common.registry import rollout as moves
from common.settings import Settings, get_settings
from common.store import roles
from common.store import variants as live
from models import rollout as policy

ROLLED_BACK_EVENT = "mlops.rollout.rolled_back"
"""The `event` of the alert a rollback posts to MONITOR_WEBHOOK_URL."""
PROMOTED, ROLLED_BACK, HELD = "promoted", "rolled back", "held"


@dataclass(frozen=True)
class Step:
    """What one step saw and decided: the record `rollout.step.<n>` keeps."""

    step: int
    weight: float
    action: str
    reason: str
    at: str
    champion: dict[str, Any]
    challenger: dict[str, Any]
    comparisons: list[dict[str, Any]]


@dataclass(frozen=True)
class Outcome:
    """How the rollout ended, and the steps it judged."""

    model_name: str
    champion: str
    challenger: str
    outcome: str
    """`promoted`, `rolled back` or `held`."""
    reason: str
    steps: list[Step] = field(default_factory=list)
    metric: str | None = None
    """The metric that rolled the challenger back."""


def _by() -> str:
    return f"rollout flow (prefect flow run {flow_run.id})" if flow_run.id else "rollout flow"


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def variants_of(settings: Settings, name: str) -> tuple[str, str]:
    """(champion, challenger) versions of `name`; a UserError without a challenger."""
    champion, challenger = moves.candidates(registry.connect(settings), name)
    return str(champion.version), str(challenger.version)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def set_weight(settings: Settings, name: str, weight: float, reason: str) -> None:
    """The challenger's share of traffic: the predictor follows within one alias poll."""
    moves.set_weight(registry.connect(settings), name, weight, by=_by(), reason=reason)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def read_numbers(  # noqa: PLR0917  (a task's inputs are its signature)
    database_url: str,
    name: str,
    versions: dict[str, str],
    start: datetime,
    step_start: datetime,
    tenant: str | None,
) -> dict[str, live.VariantNumbers]:
    """Both variants' live numbers since the rollout began (and since the step began)."""
    return live.live_numbers(
        database_url,
        name,
        versions,
        start=start,
        step_start=step_start,
        end=datetime.now(UTC),
        tenants=None if tenant is None else [tenant],
    )


@task(cache_policy=NO_CACHE)
def judge(
    rules: RolloutParams, numbers: dict[str, live.VariantNumbers], weight: float, last: bool
) -> policy.Verdict:
    """The step's verdict from the live numbers (hold, advance, promote, roll back)."""
    return policy.judge(rules, numbers[CHAMPION], numbers[CHALLENGER], weight=weight, last=last)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def record_step(settings: Settings, name: str, version: str, step: Step) -> None:
    """`rollout.step.<n>` on the challenger version."""
    moves.record_step(registry.connect(settings), name, version, step.step, asdict(step))


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def promote(
    settings: Settings, name: str, versions: dict[str, str], reason: str, evidence: dict[str, Any]
) -> None:
    """Champion moves to the challenger (the one promotion path), its weight back to 0."""
    moves.promote(
        registry.connect(settings),
        name,
        versions[CHALLENGER],
        champion=versions[CHAMPION],
        by=_by(),
        reason=reason,
        evidence=evidence,
    )


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def stop(
    settings: Settings, name: str, versions: dict[str, str], reason: str, outcome: str
) -> None:
    """Weight 0 and the outcome on the challenger; a rollback also drops the `challenger`
    alias, a hold keeps it for a later rollout. The champion is untouched."""
    end = moves.roll_back if outcome == ROLLED_BACK else moves.hold
    end(
        registry.connect(settings),
        name,
        versions[CHALLENGER],
        champion=versions[CHAMPION],
        by=_by(),
        reason=reason,
    )


@task(cache_policy=NO_CACHE)
def alert(settings: Settings, payload: dict[str, Any]) -> None:
    """POST the rollback to MONITOR_WEBHOOK_URL, if set; a failure is logged, not raised."""
    failure = alerts.post_webhook(settings.monitor_webhook_url, payload)
    if failure:  # the rollback is also in the log, the artifact and the version's tags
        get_run_logger().error(failure)


def _step_record(
    step: int, weight: float, verdict: policy.Verdict, numbers: dict[str, live.VariantNumbers]
) -> Step:
    return Step(
        step=step,
        weight=weight,
        action=verdict.action,
        reason=verdict.reason,
        at=datetime.now(UTC).isoformat(timespec="seconds"),
        champion=numbers[CHAMPION].summary(),
        challenger=numbers[CHALLENGER].summary(),
        comparisons=[
            {k: v for k, v in asdict(c).items() if v not in ("", None)} for c in verdict.comparisons
        ],
    )


def _value(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}{unit}"
    return f"{value:,}{unit}" if isinstance(value, int) else str(value)


def table(step: Step) -> str:
    """The step's per-variant numbers as a markdown table (printed and kept as an artifact)."""
    rows = [
        ("version", "version", ""),
        ("requests", "requests", ""),
        ("requests this step", "step_requests", ""),
        ("errors", "errors", ""),
        ("error rate", "error_rate", ""),
        ("latency p50", "latency_p50_ms", " ms"),
        ("latency p95", "latency_p95_ms", " ms"),
        ("labelled", "labelled", ""),
        ("accuracy", "accuracy", ""),
    ]
    lines = ["| | champion | challenger |", "|---|---|---|"]
    lines += [
        f"| {label} | {_value(step.champion[key], unit)} | {_value(step.challenger[key], unit)} |"
        for label, key, unit in rows
    ]
    auc = next((c for c in step.comparisons if c["metric"] == policy.ROC_AUC), None)
    if auc and auc.get("judged"):
        lines.append(f"| roc auc | {_value(auc['champion'])} | {_value(auc['challenger'])} |")
    return "\n".join(lines)


def _report(name: str, step: Step, steps: int) -> None:
    heading = f"## rollout {name}: step {step.step}/{steps} at {step.weight:g}%: {step.action}"
    text = f"{heading}\n\n{table(step)}\n\n{step.reason}\n"
    print(text, flush=True)
    get_run_logger().info(
        "step %d at %g%%: %s: %s", step.step, step.weight, step.action, step.reason
    )
    create_markdown_artifact(text, key="rollout-step", description=heading.removeprefix("## "))


def _evidence(rules: RolloutParams, steps: list[Step]) -> dict[str, Any]:
    """What a promotion rests on: the policy and each step's weight, verdict and numbers."""
    last = steps[-1]
    return {
        "decided_in": "rollout flow",
        "policy": rules.model_dump(exclude={"canary", "poll_seconds", "step_timeout_seconds"}),
        "steps": [{"weight": s.weight, "action": s.action} for s in steps],
        "champion": last.champion,
        "challenger": last.challenger,
        "comparisons": last.comparisons,
    }


def _wait_for_verdict(  # noqa: PLR0917  (the step's inputs)
    rules: RolloutParams,
    database_url: str,
    name: str,
    versions: dict[str, str],
    start: datetime,
    tenant: str | None,
    weight: float,
    last: bool,
) -> tuple[policy.Verdict, dict[str, live.VariantNumbers], bool]:
    """Poll the live numbers until the step has a verdict; (verdict, numbers, timed out)."""
    step_start = datetime.now(UTC)
    deadline = time.monotonic() + rules.step_timeout_seconds
    while True:
        numbers = read_numbers(database_url, name, versions, start, step_start, tenant)
        verdict = judge(rules, numbers, weight, last)
        if verdict.action != policy.HOLD:
            return verdict, numbers, False
        if time.monotonic() + rules.poll_seconds > deadline:
            return verdict, numbers, True
        get_run_logger().info("at %g%%: %s", weight, verdict.reason)
        time.sleep(rules.poll_seconds)


@flow(name="rollout")
def rollout(tenant: str | None = None, project_dir: str = ".") -> Outcome:
    """Ramp the challenger through params.yaml `rollout.steps`; promote it or roll it back."""
    settings = get_settings()
    rules = load_params(Path(project_dir) / "params.yaml").for_tenant(tenant).rollout
    name = registry.model_name(settings, tenant)
    champion, challenger = variants_of(settings, name)
    versions = {CHAMPION: champion, CHALLENGER: challenger}
    logger = get_run_logger()
    logger.info("%s: rolling out v%s against champion v%s", name, challenger, champion)
    with prediction_db(settings, reuse_running=True, role=roles.FLOWS) as database_url:
        try:
            return _ramp(settings, rules, database_url, name, versions, tenant)
        except Exception as exc:  # nobody would watch a challenger left on traffic
            set_weight(settings, name, 0, f"rollout stopped by an error: {exc}")
            raise


def _ramp(  # noqa: PLR0917  (the rollout's inputs)
    settings: Settings,
    rules: RolloutParams,
    database_url: str,
    name: str,
    versions: dict[str, str],
    tenant: str | None,
) -> Outcome:
    """Each step in turn until one promotes, rolls back or holds."""
    start = datetime.now(UTC)
    steps: list[Step] = []
    for n, weight in enumerate(rules.steps, start=1):
        last = n == len(rules.steps)
        set_weight(settings, name, weight, f"rollout step {n}/{len(rules.steps)}")
        verdict, numbers, timed_out = _wait_for_verdict(
            rules, database_url, name, versions, start, tenant, weight, last
        )
        if timed_out:
            verdict = policy.Verdict(
                policy.HOLD,
                f"no verdict within {rules.step_timeout_seconds:g} s at {weight:g}% "
                f"({verdict.reason})",
                verdict.comparisons,
            )
        step = _step_record(n, weight, verdict, numbers)
        steps.append(step)
        record_step(settings, name, versions[CHALLENGER], step)
        _report(name, step, len(rules.steps))
        if verdict.action == policy.HOLD:
            stop(settings, name, versions, verdict.reason, HELD)
            return _end(name, versions, HELD, verdict.reason, steps)
        if verdict.action == policy.ROLL_BACK:
            stop(settings, name, versions, verdict.reason, ROLLED_BACK)
            outcome = _end(name, versions, ROLLED_BACK, verdict.reason, steps, verdict)
            alert(settings, _alert_payload(outcome, verdict, tenant))
            return outcome
        if verdict.action == policy.PROMOTE:
            promote(settings, name, versions, verdict.reason, _evidence(rules, steps))
            return _end(name, versions, PROMOTED, verdict.reason, steps)
    raise AssertionError("the last step promotes, rolls back or holds")  # pragma: no cover


def _end(  # noqa: PLR0917
    name: str,
    versions: dict[str, str],
    outcome: str,
    reason: str,
    steps: list[Step],
    verdict: policy.Verdict | None = None,
) -> Outcome:
    failed = verdict.failed if verdict is not None else None
    result = Outcome(
        name,
        versions[CHAMPION],
        versions[CHALLENGER],
        outcome,
        reason,
        steps,
        failed.metric if failed else None,
    )
    level = "warning" if outcome == ROLLED_BACK else "info"
    getattr(get_run_logger(), level)(
        "%s: challenger v%s %s (champion v%s): %s",
        name,
        versions[CHALLENGER],
        outcome,
        versions[CHAMPION],
        reason,
    )
    return result


def _alert_payload(outcome: Outcome, verdict: policy.Verdict, tenant: str | None) -> dict[str, Any]:
    """The webhook's body: which model, which versions, the metric and by how much."""
    failed = verdict.failed
    return {
        "event": ROLLED_BACK_EVENT,
        "model_name": outcome.model_name,
        "tenant_id": tenant,
        "champion_version": outcome.champion,
        "challenger_version": outcome.challenger,
        "metric": failed.metric if failed else None,
        "champion_value": failed.champion if failed else None,
        "challenger_value": failed.challenger if failed else None,
        "worse_by": failed.worse_by if failed else None,
        "margin": failed.margin if failed else None,
        "p_value": failed.p_value if failed else None,
        "weight": outcome.steps[-1].weight,
        "summary": outcome.reason,
    }


def main(argv: list[str] | None = None) -> None:
    """`python -m flows.rollout [--tenant acme]`: run the rollout here and say how it ended;
    no challenger (or no champion) is one line, not a traceback."""
    parser = argparse.ArgumentParser(prog="python -m flows.rollout", description=main.__doc__)
    parser.add_argument("--tenant", default=None, help="a tenant's own model (default: shared)")
    parser.add_argument("--project-dir", default=".", help="where params.yaml is")
    args = parser.parse_args(argv)
    tenant = args.tenant or None
    load_params(Path(args.project_dir) / "params.yaml").for_tenant(tenant)  # a UserError first
    settings = get_settings()
    name = registry.model_name(settings, tenant)
    champion, challenger = moves.candidates(registry.connect(settings), name)
    print(f"{name}: rolling out v{challenger.version} against champion v{champion.version}")
    outcome = rollout(tenant=tenant, project_dir=args.project_dir)
    print(f"{name}: challenger v{outcome.challenger} {outcome.outcome}: {outcome.reason}")


if __name__ == "__main__":
    run_cli(main)
