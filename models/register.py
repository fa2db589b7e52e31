"""register: a new model version, alias `challenger`, promoted to `champion` only through the gate.

The gate scores the current champion on the same holdout as the new version; the new
one is promoted only if there is no champion or it is better by `register.margin`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from common import paths, registry
from common.errors import run_cli
from common.lineage import file_md5, git_commit
from common.params import Params, load_params
from common.settings import Settings, get_settings
from models.evaluate import LOWER_IS_BETTER, score


@dataclass(frozen=True)
class Decision:
    model_name: str
    version: str
    promoted: bool
    reason: str
    metric: str
    challenger_score: float
    champion_version: str | None
    champion_score: float | None


def gate(
    metric: str,
    margin: float,
    challenger: float,
    champion: float | None,
    champion_version: str | None,
) -> tuple[bool, str]:
    """Promote when there is no champion, or the challenger wins by at least `margin`."""
    if champion is None:
        return True, "no champion yet"
    gain = champion - challenger if metric in LOWER_IS_BETTER else challenger - champion
    verdict = "beats" if gain >= margin else "does not beat"
    return gain >= margin, (
        f"{metric} {challenger:.4f} vs champion v{champion_version} {champion:.4f} on the same "
        f"holdout: {verdict} it by the margin {margin} (gain {gain:+.4f})"
    )


def _champion_score(
    client: MlflowClient, name: str, holdout: pd.DataFrame, params: Params
) -> tuple[str | None, float | None, str | None]:
    """Score the champion on this holdout; (version, score, why-not) when it cannot be scored."""
    current = registry.version_by_alias(client, name, registry.CHAMPION)
    if current is None:
        return None, None, None
    try:
        model = mlflow.sklearn.load_model(f"models:/{name}/{current.version}")
        return current.version, score(model, holdout, params.data)[params.register_.metric], None
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
    metric = params.register_.metric

    holdout = pd.read_parquet(paths.HOLDOUT)
    champion_version, champion_score, unscorable = _champion_score(client, name, holdout, params)

    mv = mlflow.register_model(train_run["model_uri"], name)
    version = str(mv.version)
    registry.set_tags(
        client,
        name,
        version,
        {
            "git.commit": git_commit(),
            "dvc.raw_md5": client.get_run(train_run["run_id"]).data.tags.get(
                "dvc.raw_md5", "unknown"
            ),
            "dvc.train_md5": file_md5(paths.TRAIN),
            "dvc.holdout_md5": file_md5(paths.HOLDOUT),
            "params.train": json.dumps(params.train.model_dump(), sort_keys=True),
            "metrics": json.dumps(
                {k: round(v, 6) for k, v in holdout_metrics.items()}, sort_keys=True
            ),
            **{f"metric.{k}": round(v, 6) for k, v in holdout_metrics.items() if k != "rows"},
            "onnx.parity": "passed" if train_run["onnx_parity"] else "failed",
            "onnx.max_abs_diff": f"{train_run['onnx_max_abs_diff']:.3e}",
            "mlflow.run_id": train_run["run_id"],
            **(
                {"prefect.flow_run_id": settings.prefect_flow_run_id}
                if settings.prefect_flow_run_id
                else {}
            ),
        },
    )
    by = "register stage (dvc repro)"
    registry.move_alias(client, name, registry.CHALLENGER, version, by=by, reason="new candidate")

    challenger_score = float(holdout_metrics[metric])
    if unscorable:
        promoted, reason = False, unscorable + "; move the alias by hand if this is intended"
    else:
        promoted, reason = gate(
            metric, params.register_.margin, challenger_score, champion_score, champion_version
        )
    held = promoted and champion_version is not None and params.promote.require_approval
    if held:  # a person decides in the promote flow; the gate alone must not move champion
        promoted, reason = False, f"{reason}; held for approval (promote.require_approval)"
    registry.set_tags(
        client,
        name,
        version,
        {
            "gate.decision": "held" if held else "promoted" if promoted else "rejected",
            "gate.reason": reason,
            "gate.decided_by": by,
        },
    )
    if promoted:
        registry.move_alias(client, name, registry.CHAMPION, version, by=by, reason=reason)
        client.delete_registered_model_alias(name, registry.CHALLENGER)

    decision = Decision(
        name, version, promoted, reason, metric, challenger_score, champion_version, champion_score
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
