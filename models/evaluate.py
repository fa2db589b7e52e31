"""evaluate: holdout metrics, confusion matrix and ROC curve, as DVC metrics/plots and in MLflow.

The ROC plot (plots/roc.csv: fpr, tpr) is the positive class's curve for a binary target
and the micro-averaged one-vs-rest curve for a multiclass one, one line either way, as
DVC's `simple` template draws it; the MLflow run also gets every class's one-vs-rest curve.
`--tenant <id>` (the `tenant-evaluate@<id>` stage) scores that tenant's model on its own holdout.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.data.pandas_dataset import from_pandas
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    roc_auc_score,
    roc_curve,
)

from common import paths, registry
from common.errors import run_cli
from common.params import DataParams, load_params, stage_tenant
from common.registry import trust
from common.settings import Settings, get_settings
from models.data import model_frame, proba_column, target
from models.predict import load_pipeline

LOWER_IS_BETTER = {"log_loss"}


def metrics(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    """Accuracy, macro F1, ROC AUC (one-vs-rest when multiclass) and log loss."""
    pred = classes[proba.argmax(axis=1)]
    if len(classes) == 2:
        auc = roc_auc_score(y == classes[1], proba[:, 1])
    else:
        auc = roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=classes)
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "f1_macro": float(f1_score(y, pred, average="macro")),
        "roc_auc": float(auc),
        "log_loss": float(log_loss(y, proba, labels=classes)),
    }


def score(model: Any, holdout: pd.DataFrame, data: DataParams) -> dict[str, float]:
    """A fitted classifier's metrics on a holdout table."""
    proba = model.predict_proba(model_frame(holdout, data))
    return metrics(target(holdout, data), proba, model.classes_)


MICRO = "micro"
"""The `class` of the micro-averaged curve in `roc_curves` (every class's scores pooled)."""


def _curve(positive: np.ndarray, score: np.ndarray, points: int = 200) -> pd.DataFrame:
    """One ROC curve, thinned to at most `points` points (first and last kept)."""
    fpr, tpr, _ = roc_curve(positive, score)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), points)).astype(int))
    return pd.DataFrame({"fpr": fpr[keep], "tpr": tpr[keep]})


def roc_curves(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> pd.DataFrame:
    """ROC curves as rows (class, fpr, tpr): the positive class's for a binary target; for a
    multiclass one, each class against the rest and the micro average (class MICRO)."""
    if len(classes) == 2:
        return _curve(y == classes[1], proba[:, 1]).assign(**{"class": str(classes[1])})
    onehot = y[:, None] == classes[None, :]
    curves = [
        _curve(onehot[:, i], proba[:, i]).assign(**{"class": str(c)}) for i, c in enumerate(classes)
    ]
    curves.append(_curve(onehot.ravel(), proba.ravel()).assign(**{"class": MICRO}))
    return pd.concat(curves, ignore_index=True)[["class", "fpr", "tpr"]]


def _write_plots(
    y: np.ndarray, proba: np.ndarray, classes: np.ndarray, where: paths.Layout = paths.SHARED
) -> pd.DataFrame:
    """plots/confusion.csv and plots/roc.csv (one curve: see the module doc); return every curve."""
    pred = classes[proba.argmax(axis=1)]
    where.CONFUSION.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"actual": y, "predicted": pred}).to_csv(where.CONFUSION, index=False)
    curves = roc_curves(y, proba, classes)
    plotted = curves["class"] == (str(classes[1]) if len(classes) == 2 else MICRO)
    curves.loc[plotted, ["fpr", "tpr"]].to_csv(where.ROC, index=False)
    return curves


def run(
    data: DataParams, settings: Settings, where: paths.Layout = paths.SHARED
) -> dict[str, float]:
    train_run = json.loads(where.TRAIN_RUN.read_text())
    registry.connect(settings)
    with tempfile.TemporaryDirectory(prefix="mlops-evaluate-") as tmp:
        files = trust.download_logged(
            train_run["model_uri"], train_run.get("manifest_sha256"), Path(tmp) / "model"
        )
        model = load_pipeline(files)
    holdout = pd.read_parquet(where.HOLDOUT)
    y = target(holdout, data)
    proba = model.predict_proba(model_frame(holdout, data))
    result = metrics(y, proba, model.classes_)
    cm = confusion_matrix(y, model.classes_[proba.argmax(axis=1)], labels=model.classes_)

    where.METRICS.parent.mkdir(parents=True, exist_ok=True)
    where.METRICS.write_text(json.dumps({**result, "rows": len(holdout)}, indent=2) + "\n")
    curves = _write_plots(y, proba, model.classes_, where)

    with mlflow.start_run(run_id=train_run["run_id"]):
        holdout_ds = from_pandas(
            holdout, source=str(where.HOLDOUT), targets=data.target, name="holdout"
        )
        mlflow.log_metrics(
            {f"holdout_{k}": v for k, v in result.items()},
            model_id=train_run["model_id"],
            dataset=holdout_ds,
        )
        labels = [str(c) for c in model.classes_]
        mlflow.log_dict(
            {"labels": labels, "matrix": cm.tolist(), "rows": "actual", "columns": "predicted"},
            "evaluation/confusion_matrix.json",
        )
        predictions = pd.DataFrame(
            proba, columns=[proba_column(c) for c in labels], index=holdout.index
        )
        predictions["actual"] = y
        mlflow.log_table(predictions.reset_index(), "evaluation/holdout_predictions.json")
        mlflow.log_table(curves, "evaluation/roc_curves.json")
    return result


def main() -> None:
    tenant = stage_tenant()
    params = load_params().for_tenant(tenant)
    result = run(params.data, get_settings(), paths.layout(tenant))
    print("evaluate: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))


if __name__ == "__main__":
    run_cli(main)
