"""evaluate: holdout metrics and the ROC plot for binary and multiclass targets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from common import paths
from models import evaluate


@pytest.fixture
def plots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    assert paths.ROC.parent == paths.CONFUSION.parent
    return tmp_path / paths.ROC.parent


def three_classes(rows: int = 900, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and informative (noisy) probabilities of three string classes."""
    rng = np.random.default_rng(seed)
    classes = np.array(["Adelie", "Chinstrap", "Gentoo"], dtype=object)
    y = classes[rng.integers(0, 3, rows)]
    logits = rng.normal(0, 1, (rows, 3)) + 1.5 * (y[:, None] == classes[None, :])
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, proba, classes


def test_binary_roc_plot_is_the_positive_class_curve_as_before(plots: Path) -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 5_000)
    p1 = np.clip(0.3 * y + rng.random(5_000) * 0.7, 0, 1)
    proba = np.column_stack([1 - p1, p1])

    evaluate._write_plots(y, proba, np.array([0, 1]))

    fpr, tpr, _ = roc_curve(y == 1, p1)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), 200)).astype(int))
    expected = pd.DataFrame({"fpr": fpr[keep], "tpr": tpr[keep]})
    pd.testing.assert_frame_equal(pd.read_csv(plots / "roc.csv"), expected)
    assert list(pd.read_csv(plots / "confusion.csv").columns) == ["actual", "predicted"]


def test_multiclass_gets_a_micro_average_roc_plot(plots: Path) -> None:
    y, proba, classes = three_classes()

    evaluate._write_plots(y, proba, classes)

    roc = pd.read_csv(plots / "roc.csv")
    assert list(roc.columns) == ["fpr", "tpr"]
    assert roc.iloc[0].tolist() == [0.0, 0.0]
    assert roc.iloc[-1].tolist() == [1.0, 1.0]
    assert roc["fpr"].is_monotonic_increasing
    assert len(roc) <= 200
    onehot = y[:, None] == classes[None, :]
    area = float(np.trapezoid(roc["tpr"], roc["fpr"]))
    assert area == pytest.approx(roc_auc_score(onehot.ravel(), proba.ravel()), abs=0.01)


def test_multiclass_roc_curves_hold_each_class_against_the_rest_and_the_micro_average() -> None:
    y, proba, classes = three_classes()

    curves = evaluate.roc_curves(y, proba, classes)

    assert list(curves.columns) == ["class", "fpr", "tpr"]
    assert list(curves["class"].unique()) == [*classes, evaluate.MICRO]
    for i, label in enumerate(classes):
        curve = curves[curves["class"] == label]
        area = float(np.trapezoid(curve["tpr"], curve["fpr"]))
        assert area == pytest.approx(roc_auc_score(y == label, proba[:, i]), abs=0.01)


def test_multiclass_metrics_hold_what_the_promotion_policy_reads() -> None:
    y, proba, classes = three_classes()

    result = evaluate.metrics(y, proba, classes)

    assert set(result) == {"accuracy", "f1_macro", "roc_auc", "log_loss"}
    assert result["roc_auc"] == pytest.approx(
        roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=classes)
    )
    assert 0.6 < result["roc_auc"] < 1.0
    assert 0.0 < result["log_loss"] < np.log(3)
