"""register: a new model version, alias `challenger`, promoted to `champion` only through the gate.

A promotion goes through `common.registry.promotion.move_champion`, the one path every move
of `champion` takes (the promote flow's and a rollback's too), so the version records the
champion it replaced, the gate's evidence (policy, both versions' metrics on the holdout)
and rollback works after it; `gate.*` records the gate's verdict whatever it was.

The gate scores the current champion on the same holdout as the new version; the new
one is promoted only if there is no champion or it passes the promotion policy
(`promote.improve` / `promote.no_worse` in params.yaml, the same as the promote flow's).
With params.yaml `rollout.canary: true` and a champion of its own, a version that passes
is not promoted: it stays `challenger` (`gate.decision: canary`, the gate's evidence in
`alias.challenger.evidence`) and the rollout flow ramps it on live traffic; a model's first
version still becomes champion directly. `promote.require_approval` wins over a canary.

`--tenant <id>` (the `tenant-register@<id>` stage) registers the tenant's own model as
`<MODEL_NAME>.<id>` (common.registry.model_name), tagged with the tenant and its source, and
gates it against the tenant's champion on the tenant's holdout. A tenant's first version has
no champion of its own: it is gated against the shared champion, scored on the tenant's
holdout, so a tenant leaves the shared model only for one that serves its data better.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from common import paths, registry
from common.errors import UserError, run_cli
from common.lineage import file_md5, git_commit
from common.params import Params, PromoteParams, load_params, stage_tenant
from common.registry import promotion, served, trust
from common.registry import tags as tag
from common.settings import Settings, get_settings
from models.evaluate import score
from models.promote import judge


@dataclass(frozen=True)
class Decision:
    model_name: str
    version: str
    promoted: bool
    reason: str
    challenger_metrics: dict[str, float]
    champion_version: str | None
    champion_metrics: dict[str, float] | None
    tenant: str | None = None
    champion_model: str | None = None
    """The registered model the champion it was gated against belongs to (a tenant's first
    version: the shared model)."""
    canary: bool = False
    """Passed the gate with `rollout.canary` on: `challenger` for the rollout flow."""


def gate(
    policy: PromoteParams,
    challenger: dict[str, float],
    champion: dict[str, float] | None,
    champion_version: str | None,
    against: str = "champion",
) -> tuple[bool, str]:
    """Promote when there is no champion, or the challenger passes the promotion policy.

    `against` names the champion in the reason (a tenant's first version: the shared one).
    """
    verdict = judge(policy, challenger, champion)
    if champion is None:
        return verdict.passed, verdict.summary
    outcome = "passes" if verdict.passed else "fails"
    return verdict.passed, (
        f"vs {against} v{champion_version} on the same holdout, {outcome} the promotion "
        f"policy: {verdict.summary}"
    )


def _champion_metrics(
    client: MlflowClient, name: str, holdout: pd.DataFrame, params: Params, cache: Path
) -> tuple[str | None, dict[str, float] | None, str | None]:
    """Score the champion on this holdout; (version, metrics, why-not) when it cannot be."""
    current = registry.version_by_alias(client, name, registry.CHAMPION)
    if current is None:
        return None, None, None
    try:
        model = served.fetch(current, cache).pipeline
        return current.version, score(model, holdout, params.data), None
    except trust.UntrustedModelError as exc:
        return current.version, None, f"champion v{current.version} was refused: {exc}"
    except (KeyError, ValueError) as exc:
        return (
            current.version,
            None,
            f"champion v{current.version} cannot score this holdout ({exc})",
        )


def _rival(client: MlflowClient, settings: Settings, tenant: str | None) -> tuple[str, str]:
    """The registered model whose champion the new version must beat, and how to name it.

    A tenant with a champion of its own: that one. Without (its first version, or none
    promoted yet): the shared model's, which serves the tenant until then.
    """
    own = registry.model_name(settings, tenant)
    if tenant is None or registry.version_by_alias(client, own, registry.CHAMPION):
        return own, "champion"
    shared = registry.model_name(settings)
    return shared, f"the shared champion {shared}"


def _canary(
    client: MlflowClient, name: str, version: str, *, by: str, reason: str, evidence: dict[str, Any]
) -> None:
    """`challenger` points at `version` for the rollout flow, with the gate's evidence; the
    rollout's end records the decision (`promote.decision`)."""
    registry.move_alias(client, name, registry.CHALLENGER, version, by=by, reason=reason)
    registry.set_tags(
        client,
        name,
        version,
        {
            tag.alias_tag(registry.CHALLENGER, tag.ALIAS_EVIDENCE): promotion.shorten(
                json.dumps(evidence, sort_keys=True, default=str)
            )
        },
    )


def run(
    params: Params,
    settings: Settings,
    where: paths.Layout = paths.SHARED,
    source: str | None = None,
) -> Decision:
    """Register, tag, gate; `source`: how params.yaml declares a tenant's data source."""
    train_run = json.loads(where.TRAIN_RUN.read_text())
    sealed = train_run.get("manifest_sha256")
    if not sealed:
        raise UserError(
            f"{where.TRAIN_RUN} records no manifest_sha256: the model was trained before "
            "models were sealed; retrain it (`dvc repro`, or `make demo`)."
        )
    holdout_metrics = json.loads(where.METRICS.read_text())
    client = registry.connect(settings)
    tenant = where.tenant
    name = registry.model_name(settings, tenant)
    holdout = pd.read_parquet(where.HOLDOUT)
    rival, against = _rival(client, settings, tenant)
    champion_version, champion_metrics, unscorable = _champion_metrics(
        client, rival, holdout, params, served.cache_dir(settings)
    )

    mv = mlflow.register_model(train_run["model_uri"], name)
    version = str(mv.version)
    holdout_md5 = file_md5(where.HOLDOUT)
    registry.set_tags(
        client,
        name,
        version,
        {
            tag.GIT_COMMIT: git_commit(),
            tag.DVC_RAW_MD5: client.get_run(train_run["run_id"]).data.tags.get(
                tag.DVC_RAW_MD5, "unknown"
            ),
            tag.DVC_TRAIN_MD5: file_md5(where.TRAIN),
            tag.DVC_HOLDOUT_MD5: holdout_md5,
            tag.PARAMS_TRAIN: json.dumps(params.train.model_dump(), sort_keys=True),
            tag.METRICS: json.dumps(
                {k: round(v, 6) for k, v in holdout_metrics.items()}, sort_keys=True
            ),
            **{tag.metric_tag(k): round(v, 6) for k, v in holdout_metrics.items() if k != "rows"},
            tag.ONNX_PARITY: tag.parity(train_run["onnx_parity"]),
            tag.ONNX_MAX_ABS_DIFF: f"{train_run['onnx_max_abs_diff']:.3e}",
            tag.MLFLOW_RUN_ID: train_run["run_id"],
            tag.MANIFEST_SHA256: sealed,
            **(
                {tag.PREFECT_FLOW_RUN_ID: settings.prefect_flow_run_id}
                if settings.prefect_flow_run_id
                else {}
            ),
            **({tag.TENANT: tenant} if tenant else {}),
            **({tag.DATA_SOURCE: promotion.shorten(source)} if source else {}),
        },
    )
    # the registered files are the ones sealed at training, or nothing moves to them
    served.fetch(client.get_model_version(name, version), served.cache_dir(settings))
    by = "register stage (dvc repro)" if tenant is None else f"tenant-register@{tenant} (dvc repro)"
    registry.move_alias(client, name, registry.CHALLENGER, version, by=by, reason="new candidate")

    challenger_metrics = {k: float(v) for k, v in holdout_metrics.items() if k != "rows"}
    if unscorable:
        promoted, reason = False, unscorable + "; move the alias by hand if this is intended"
    else:
        promoted, reason = gate(
            params.promote, challenger_metrics, champion_metrics, champion_version, against
        )
    held = promoted and champion_version is not None and params.promote.require_approval
    if held:  # a person decides in the promote flow; the gate alone must not move champion
        promoted, reason = False, f"{reason}; held for approval (promote.require_approval)"
    # a canary: live traffic decides (flows/rollout.py); a model's first version has no
    # champion of its own to compare with, so it still becomes champion directly
    canary = promoted and rival == name and champion_version is not None and params.rollout.canary
    if canary:
        promoted = False
        reason = f"{reason}; canary: challenger for the rollout flow (rollout.canary)"
    verdict = (
        "held" if held else tag.GATE_CANARY if canary else "promoted" if promoted else "rejected"
    )
    registry.set_tags(
        client,
        name,
        version,
        {tag.GATE_DECISION: verdict, tag.GATE_REASON: reason, tag.GATE_DECIDED_BY: by},
    )
    evidence = {
        "gate": "register stage",
        "policy": params.promote.model_dump(include={"improve", "no_worse"}),
        "holdout_md5": holdout_md5,
        "challenger": {"model": name, "version": version, "metrics": challenger_metrics},
        "champion": (
            {"model": rival, "version": champion_version, "metrics": champion_metrics}
            if champion_version
            else None
        ),
    }
    if canary:
        _canary(client, name, version, by=by, reason=reason, evidence=evidence)
    elif promoted:
        promotion.move_champion(client, name, version, by=by, reason=reason, evidence=evidence)
    else:
        promotion.record_decision(client, name, version, decision=verdict, by=by, reason=reason)

    decision = Decision(
        name,
        version,
        promoted,
        reason,
        challenger_metrics,
        champion_version,
        champion_metrics,
        tenant,
        rival if champion_version else None,
        canary,
    )
    where.REGISTER_REPORT.parent.mkdir(parents=True, exist_ok=True)
    where.REGISTER_REPORT.write_text(json.dumps(asdict(decision), indent=2) + "\n")
    return decision


def main() -> None:
    tenant = stage_tenant()
    params = load_params()
    source = params.tenants[tenant].source.describe() if tenant in params.tenants else None
    decision = run(params.for_tenant(tenant), get_settings(), paths.layout(tenant), source)
    verdict = "promoted to champion" if decision.promoted else "kept as challenger"
    print(f"register: {decision.model_name} v{decision.version} {verdict}: {decision.reason}")


if __name__ == "__main__":
    run_cli(main)
