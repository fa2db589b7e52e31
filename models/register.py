"""register: a new model version, alias `challenger`, promoted to `champion` only through the gate.

The gate scores the current champion on the same holdout as the new version; the new
one is promoted only if there is no champion or it passes the promotion policy
(`promote.improve` / `promote.no_worse` in params.yaml, the same as the promote flow's).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from common import paths, registry
from common.errors import run_cli
from common.lineage import file_md5, git_commit
from common.params import Params, PromoteParams, load_params
from common.registry import served
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


def gate(
    policy: PromoteParams,
    challenger: dict[str, float],
    champion: dict[str, float] | None,
    champion_version: str | None,
) -> tuple[bool, str]:
    """Promote when there is no champion, or the challenger passes the promotion policy."""
    verdict = judge(policy, challenger, champion)
    if champion is None:
        return verdict.passed, verdict.summary
    outcome = "passes" if verdict.passed else "fails"
    return verdict.passed, (
        f"vs champion v{champion_version} on the same holdout, {outcome} the promotion "
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
    except (KeyError, ValueError) as exc:
        return (
            current.version,
            None,
            f"champion v{current.version} cannot score this holdout ({exc})",
        )


def run(params: Params, settings: Settings) -> Decision:
    train_run = json.loads(paths.TRAIN_RUN.read_text())
    holdout_metrics = json.loads(paths.METRICS.read_text())
    client = registry.connect(settings)
    name = settings.model_name
    holdout = pd.read_parquet(paths.HOLDOUT)
    champion_version, champion_metrics, unscorable = _champion_metrics(
        client, name, holdout, params, served.cache_dir(settings)
    )

    mv = mlflow.register_model(train_run["model_uri"], name)
    version = str(mv.version)
    registry.set_tags(
        client,
        name,
        version,
        {
            tag.GIT_COMMIT: git_commit(),
            tag.DVC_RAW_MD5: client.get_run(train_run["run_id"]).data.tags.get(
                tag.DVC_RAW_MD5, "unknown"
            ),
            tag.DVC_TRAIN_MD5: file_md5(paths.TRAIN),
            tag.DVC_HOLDOUT_MD5: file_md5(paths.HOLDOUT),
            tag.PARAMS_TRAIN: json.dumps(params.train.model_dump(), sort_keys=True),
            tag.METRICS: json.dumps(
                {k: round(v, 6) for k, v in holdout_metrics.items()}, sort_keys=True
            ),
            **{tag.metric_tag(k): round(v, 6) for k, v in holdout_metrics.items() if k != "rows"},
            tag.ONNX_PARITY: tag.parity(train_run["onnx_parity"]),
            tag.ONNX_MAX_ABS_DIFF: f"{train_run['onnx_max_abs_diff']:.3e}",
            tag.MLFLOW_RUN_ID: train_run["run_id"],
            **(
                {tag.PREFECT_FLOW_RUN_ID: settings.prefect_flow_run_id}
                if settings.prefect_flow_run_id
                else {}
            ),
        },
    )
    by = "register stage (dvc repro)"
    registry.move_alias(client, name, registry.CHALLENGER, version, by=by, reason="new candidate")

    challenger_metrics = {k: float(v) for k, v in holdout_metrics.items() if k != "rows"}
    if unscorable:
        promoted, reason = False, unscorable + "; move the alias by hand if this is intended"
    else:
        promoted, reason = gate(
            params.promote, challenger_metrics, champion_metrics, champion_version
        )
    held = promoted and champion_version is not None and params.promote.require_approval
    if held:  # a person decides in the promote flow; the gate alone must not move champion
        promoted, reason = False, f"{reason}; held for approval (promote.require_approval)"
    registry.set_tags(
        client,
        name,
        version,
        {
            tag.GATE_DECISION: "held" if held else "promoted" if promoted else "rejected",
            tag.GATE_REASON: reason,
            tag.GATE_DECIDED_BY: by,
        },
    )
    if promoted:
        registry.move_alias(client, name, registry.CHAMPION, version, by=by, reason=reason)
        client.delete_registered_model_alias(name, registry.CHALLENGER)

    decision = Decision(
        name, version, promoted, reason, challenger_metrics, champion_version, champion_metrics
    )
    paths.REGISTER_REPORT.parent.mkdir(parents=True, exist_ok=True)
    paths.REGISTER_REPORT.write_text(json.dumps(asdict(decision), indent=2) + "\n")
    return decision


def main() -> None:
    decision = run(load_params(), get_settings())
    verdict = "promoted to champion" if decision.promoted else "kept as challenger"
    print(f"register: {decision.model_name} v{decision.version} {verdict}: {decision.reason}")


if __name__ == "__main__":
    run_cli(main)
