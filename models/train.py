"""train: fit the sklearn pipeline, export it to ONNX, check parity, log one MLflow run.

`--tenant <id>` (the `tenant-train@<id>` stage) fits that tenant's own model on its own train
split, with its `tenants.<id>.train` overrides; the run is tagged with the tenant.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.data.pandas_dataset import from_pandas
from mlflow.models import infer_signature
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder

from common import paths, registry
from common.errors import UserError, run_cli
from common.lineage import file_md5, git_commit
from common.params import DataParams, MonitorParams, TrainParams, load_params, stage_tenant
from common.registry import tags as tag
from common.registry import trust
from common.settings import Settings, get_settings
from models import export
from models.data import model_frame, proba_column, target
from models.predict import SKOPS_TRUSTED

__all__ = ["SKOPS_TRUSTED", "build", "run"]  # SKOPS_TRUSTED: defined in models.predict

ONNX_FILE = "model.onnx"
REFERENCE_FILE = "reference.parquet"
HOLDOUT_SCORED_FILE = "holdout_scored.parquet"
"""The holdout with the model's predictions: monitoring's reference for prediction drift."""
CONTRACT_FILE = "data_contract.json"
"""Each feature's type, min/max and categories as trained: the predictor's request bounds."""


def build(data: DataParams, params: TrainParams) -> Pipeline:
    """Imputation and one-hot encoding feeding gradient-boosted trees (all ONNX-convertible)."""
    pre = ColumnTransformer(
        [
            ("num", SimpleImputer(strategy="median"), data.numeric),
            ("cat", OneHotEncoder(handle_unknown="ignore"), data.categorical),
        ]
    )
    clf = GradientBoostingClassifier(
        n_estimators=params.n_estimators,
        learning_rate=params.learning_rate,
        max_depth=params.max_depth,
        subsample=params.subsample,
        min_samples_leaf=params.min_samples_leaf,
        random_state=params.random_state,
    )
    return Pipeline([("preprocess", pre), ("classifier", clf)])


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    experiment_id: str
    model_id: str
    model_uri: str
    fit_seconds: float
    onnx_max_abs_diff: float
    onnx_label_mismatches: int
    onnx_parity: bool
    manifest_sha256: str
    """SHA-256 of the logged model's manifest.json: the register stage's version tag."""


def _requirements() -> list[str]:
    # Passing these skips MLflow's requirement inference, which takes ~8 s per model.
    return [f"{p}=={version(p)}" for p in ("scikit-learn", "numpy", "pandas", "scipy", "skops")]


def data_contract(data: DataParams) -> dict[str, dict[str, object]]:
    """The features' declared contract, kept with the model: later params may differ."""
    keep = {"type", "min", "max", "categories"}
    return {
        "features": {
            name: spec.model_dump(include=keep, exclude_none=True)
            for name, spec in data.features.items()
        }
    }


def scored_holdout(
    pipeline: Pipeline, holdout: pd.DataFrame, data: DataParams, monitor: MonitorParams
) -> pd.DataFrame:
    """Features, label, predicted class and probabilities of every holdout row.

    Binary: P(last class) in `monitor.probability_column`. Multiclass: every class's
    probability in `proba_<class>` (models.data.proba_column), as monitoring reads them.
    """
    proba = pipeline.predict_proba(model_frame(holdout, data))
    out = holdout[[*data.feature_names, data.target]].copy()
    out[monitor.prediction_column] = pipeline.classes_[proba.argmax(axis=1)]
    if len(pipeline.classes_) == 2:
        out[monitor.probability_column] = proba[:, -1]
    else:
        for i, label in enumerate(pipeline.classes_):
            out[proba_column(label)] = proba[:, i]
    return out


def run(
    data: DataParams,
    params: TrainParams,
    settings: Settings,
    monitor: MonitorParams | None = None,
    where: paths.Layout = paths.SHARED,
) -> TrainResult:
    """Fit, export, check parity and log; raise UserError when ONNX parity fails."""
    train_df = pd.read_parquet(where.TRAIN)
    holdout_df = pd.read_parquet(where.HOLDOUT)
    x_train, y_train = model_frame(train_df, data), target(train_df, data)
    x_hold = model_frame(holdout_df, data)

    pipeline = build(data, params)
    start = time.perf_counter()
    pipeline.fit(x_train, y_train)
    fit_seconds = time.perf_counter() - start

    onnx_bytes = export.export(pipeline, data)
    parity = export.check_parity(pipeline, onnx_bytes, x_hold, data, params.onnx_parity_atol)

    client = registry.connect(settings)
    exp_id = registry.experiment_id(client, settings)
    train_md5 = file_md5(where.TRAIN)
    raw = Path(data.path)
    run_name = "train" if where.tenant is None else f"train@{where.tenant}"
    with (
        mlflow.start_run(experiment_id=exp_id, run_name=run_name) as active,
        tempfile.TemporaryDirectory() as tmp,
    ):
        mlflow.set_tags(
            {
                tag.GIT_COMMIT: git_commit(),
                tag.DVC_RAW_MD5: file_md5(raw) if raw.exists() else "unknown",
                tag.DVC_TRAIN_MD5: train_md5,
                "data.path": data.path,
                "pipeline.stage": "train",
                **({tag.TENANT: where.tenant} if where.tenant else {}),
                **(
                    {tag.PREFECT_FLOW_RUN_ID: settings.prefect_flow_run_id}
                    if settings.prefect_flow_run_id
                    else {}
                ),
            }
        )
        mlflow.log_params(
            {
                **params.model_dump(),
                "model": "GradientBoostingClassifier",
                "features": len(data.features),
            }
        )
        train_ds = from_pandas(
            train_df,
            source=str(where.TRAIN),
            targets=data.target,
            name="train",
            digest=train_md5[:8],
        )
        hold_ds = from_pandas(
            holdout_df,
            source=str(where.HOLDOUT),
            targets=data.target,
            name="holdout",
            digest=file_md5(where.HOLDOUT)[:8],
        )
        mlflow.log_input(
            train_ds, context="training", tags={"dvc_md5": train_md5, "path": str(where.TRAIN)}
        )
        mlflow.log_input(hold_ds, context="evaluation", tags={"dvc_md5": file_md5(where.HOLDOUT)})

        onnx_path = Path(tmp) / ONNX_FILE
        onnx_path.write_bytes(onnx_bytes)
        reference_path = Path(tmp) / REFERENCE_FILE
        pd.read_parquet(where.REFERENCE).to_parquet(reference_path)
        scored_path = Path(tmp) / HOLDOUT_SCORED_FILE
        scored_holdout(pipeline, holdout_df, data, monitor or MonitorParams()).to_parquet(
            scored_path
        )
        contract_path = Path(tmp) / CONTRACT_FILE
        contract_path.write_text(json.dumps(data_contract(data), indent=2) + "\n")
        example = x_train.head(5)
        info = mlflow.sklearn.log_model(
            pipeline,
            name="model",
            signature=infer_signature(example, pipeline.predict_proba(example)),
            input_example=example,
            pyfunc_predict_fn="predict_proba",
            pip_requirements=_requirements(),
            extra_files=[str(p) for p in (onnx_path, reference_path, scored_path, contract_path)],
            # Types skops will not load unless told; this model was made here, by this stage.
            skops_trusted_types=SKOPS_TRUSTED,
        )
        sealed = trust.seal(client, str(info.model_id))
        mlflow.set_tag(tag.MANIFEST_SHA256, sealed)
        mlflow.log_metrics(
            {
                "fit_seconds": fit_seconds,
                "train_rows": float(len(train_df)),
                "onnx_max_abs_diff": parity.max_abs_diff,
                "onnx_label_mismatches": float(parity.label_mismatches),
            }
        )
        mlflow.set_tag(tag.ONNX_PARITY, tag.parity(parity.passed))
        result = TrainResult(
            run_id=active.info.run_id,
            experiment_id=exp_id,
            model_id=str(info.model_id),
            model_uri=info.model_uri,
            fit_seconds=fit_seconds,
            onnx_max_abs_diff=parity.max_abs_diff,
            onnx_label_mismatches=parity.label_mismatches,
            onnx_parity=parity.passed,
            manifest_sha256=sealed,
        )
    if not parity.passed:
        raise UserError(
            f"ONNX parity check failed on {parity.rows:,} holdout rows: "
            f"max |p_onnx - p_sklearn| = {parity.max_abs_diff:.2e} (allowed {parity.atol:.0e}), "
            f"{parity.label_mismatches} label mismatch(es). Logged in MLflow run "
            f"{result.run_id}; nothing was registered."
        )
    where.TRAIN_RUN.parent.mkdir(parents=True, exist_ok=True)
    where.TRAIN_RUN.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def main() -> None:
    tenant = stage_tenant()
    params = load_params().for_tenant(tenant)
    result = run(params.data, params.train, get_settings(), params.monitor, paths.layout(tenant))
    print(
        f"train: fitted in {result.fit_seconds:.1f} s; ONNX parity max |dp| = "
        f"{result.onnx_max_abs_diff:.1e}; MLflow run {result.run_id}"
    )


if __name__ == "__main__":
    run_cli(main)
