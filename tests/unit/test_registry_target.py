"""Which registry the pipeline writes to, and what its summary may claim about a version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from common import dvc_pipeline, paths, registry_target
from common.errors import UserError
from common.settings import Settings

pytestmark = pytest.mark.unit


def _settings(**env: str) -> Settings:
    return Settings(**env)  # type: ignore[arg-type]


def test_the_target_names_the_store_the_environment_and_its_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MLflow's set_tracking_uri (another test, same process) exports MLFLOW_TRACKING_URI
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    dev = registry_target.current(_settings(MLOPS_HOME=str(tmp_path)))
    prod = registry_target.current(
        _settings(MLOPS_ENV="prod", MLFLOW_TRACKING_URI="http://mlflow:5000")
    )

    assert dev.tracking_uri == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    assert (dev.environment, dev.model_name) == ("dev", "churn-classifier")
    assert (prod.tracking_uri, prod.environment, prod.model_name) == (
        "http://mlflow:5000",
        "prod",
        "churn-classifier-prod",
    )


def test_credentials_in_the_tracking_uri_never_reach_the_tracked_file() -> None:
    target = registry_target.current(
        _settings(MLFLOW_TRACKING_URI="https://svc:s3cr3t@mlflow.example:443/path")
    )
    assert target.tracking_uri == "https://mlflow.example:443/path"


def test_the_file_is_rewritten_only_when_the_target_changes(tmp_path: Path) -> None:
    a = registry_target.Target("sqlite:///a.db", "dev", "churn-classifier")
    b = registry_target.Target("http://mlflow:5000", "dev", "churn-classifier")

    assert registry_target.write(a, tmp_path)
    before = (tmp_path / paths.REGISTRY_TARGET).stat().st_mtime_ns
    assert not registry_target.write(a, tmp_path)
    assert (tmp_path / paths.REGISTRY_TARGET).stat().st_mtime_ns == before
    assert registry_target.write(b, tmp_path)
    assert registry_target.recorded(tmp_path) == b


def _summary(registered_now: bool, run_id: str = "run-1") -> dvc_pipeline.RunSummary:
    return dvc_pipeline.RunSummary(
        model_name="churn-classifier",
        version="2",
        promoted=True,
        reason="no champion yet",
        metrics={"roc_auc": 0.8},
        mlflow_run_id=run_id,
        registered_now=registered_now,
        registry="churn-classifier (dev) in sqlite:///a.db",
    )


def test_an_earlier_runs_version_is_told_as_unchanged_never_as_promoted() -> None:
    earlier = _summary(registered_now=False)

    line = dvc_pipeline.verdict(earlier)
    text = dvc_pipeline.summary_markdown(earlier, "sqlite:///a.db")

    assert line.startswith("unchanged: ")
    assert "in churn-classifier (dev) in sqlite:///a.db" in line
    assert "promoted to" not in line
    assert "**unchanged**" in text
    assert "promoted to" not in text
    assert dvc_pipeline.verdict(_summary(registered_now=True)).startswith("promoted to champion")


@pytest.fixture
def client(tmp_path: Path) -> MlflowClient:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("churn-classifier")
    client.create_model_version(
        "churn-classifier", source=(tmp_path / "m").as_uri(), tags={"mlflow.run_id": "run-1"}
    )
    return client


def test_a_version_missing_from_this_registry_is_an_error_naming_both(
    client: MlflowClient,
) -> None:
    present = dvc_pipeline.RunSummary(**{**_summary(False).__dict__, "version": "1"})
    dvc_pipeline.check_registered(present, client, "here")  # v1 of run-1 is there

    with pytest.raises(
        UserError,
        match=r"v2 registered in churn-classifier \(dev\) in sqlite:///a.db is not in here",
    ):
        dvc_pipeline.check_registered(_summary(False), client, "here")


def test_a_version_of_the_same_number_from_another_run_is_not_taken_for_it(
    client: MlflowClient,
) -> None:
    other = {**_summary(False, "run-9").__dict__, "version": "1"}
    with pytest.raises(UserError, match=r"v1 .* is not in here"):
        dvc_pipeline.check_registered(dvc_pipeline.RunSummary(**other), client, "here")


def test_the_summary_reads_the_recorded_target(tmp_path: Path) -> None:
    for path, body in {
        paths.REGISTER_REPORT: {
            "model_name": "churn-classifier",
            "version": "3",
            "promoted": False,
            "reason": "r",
        },
        paths.METRICS: {"roc_auc": 0.7, "rows": 5},
        paths.TRAIN_RUN: {"run_id": "abc"},
    }.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(json.dumps(body))
    registry_target.write(registry_target.Target("http://m:5000", "staging", "x-staging"), tmp_path)

    s = dvc_pipeline.summary(tmp_path, registered_now=False)

    assert (s.version, s.registered_now, s.mlflow_run_id) == ("3", False, "abc")
    assert s.registry == "x-staging (staging) in http://m:5000"
