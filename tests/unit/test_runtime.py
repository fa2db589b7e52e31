"""The predictor's model holder when the registry is away: bundled model, clear state, no crash."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from common.params import DataParams, Params
from common.registry.runtime import ModelRuntime
from common.settings import Settings
from tests.unit.test_predict import as_bundle, fitted, save_model_dir, training_rows

UNREACHABLE = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def bundled(
    params: Params, data_params: DataParams, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    pipeline = fitted(training_rows(), data_params, params)
    path = save_model_dir(
        pipeline, data_params, training_rows(), tmp_path_factory.mktemp("b") / "model"
    )
    return as_bundle(path, version="7", **{"onnx.parity": "passed"})


def offline_settings(home: Path) -> Settings:
    return Settings(MLFLOW_TRACKING_URI=UNREACHABLE, MLOPS_HOME=home)


def test_serves_the_bundled_model_when_the_registry_is_unreachable(
    bundled: Path, tmp_path: Path
) -> None:
    runtime = ModelRuntime(offline_settings(tmp_path), bundled_dir=bundled)
    info = runtime.describe()
    assert info["model_version"] == "7"
    assert info["source"] == "bundled"
    assert info["backend"] == "onnx"
    assert info["registry"]["reachable"] is False
    assert "MLFLOW_TRACKING_URI" in info["registry"]["last_error"]


def test_keeps_serving_and_reports_when_a_later_check_fails(
    bundled: Path, tmp_path: Path, data_params: DataParams
) -> None:
    runtime = ModelRuntime(offline_settings(tmp_path), bundled_dir=bundled)
    assert runtime.check_now() is False
    assert runtime.current.version == "7"
    assert runtime.registry_ok is False
    record = {
        str(k): (None if pd.isna(v) else v)
        for k, v in training_rows()[data_params.feature_names].iloc[0].items()
    }
    (scored,) = runtime.current.scorer.predict([record])
    assert abs(sum(scored.probabilities.values()) - 1) < 1e-6


def test_refuses_to_start_with_no_registry_and_no_bundle(tmp_path: Path) -> None:
    empty = tmp_path / "bundle"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="churn-classifier@champion"):
        ModelRuntime(offline_settings(tmp_path), bundled_dir=empty)
    shutil.rmtree(empty)


def test_a_wake_reaches_every_worker_sharing_the_model_cache(bundled: Path, tmp_path: Path) -> None:
    """A webhook lands on one worker; the others check at once too, not at their next poll."""
    settings = Settings(
        MLFLOW_TRACKING_URI=UNREACHABLE, MLOPS_HOME=tmp_path, MODEL_POLL_SECONDS=3600
    )
    workers = [ModelRuntime(settings, bundled_dir=bundled) for _ in range(2)]
    checks = [threading.Event() for _ in workers]
    for worker, checked in zip(workers, checks, strict=True):

        def note(_swapped: bool, done: threading.Event = checked) -> None:
            done.set()

        worker.start(on_check=note)
    try:
        time.sleep(0.2)
        assert not any(c.is_set() for c in checks)
        workers[0].wake()
        assert all(c.wait(5) for c in checks)
    finally:
        for worker in workers:
            worker.stop()
