"""One retrain per model at a time, then a cooldown: real retrain flow runs on Prefect's
ephemeral API, a real (tiny) DVC pipeline and a SQLite MLflow, in the embedded mode (the
file lock under MLOPS_HOME)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect.client.schemas.objects import State
from prefect.testing.utilities import prefect_test_harness

from common import registry, retrain_guard
from common.settings import get_settings
from flows.retrain import retrain
from tests.servers import PREFECT_STARTUP_TIMEOUT
from tests.workspace import ROOT

NAME = "churn-classifier"

STEP = """\
import json, sys, time
from pathlib import Path

name = sys.argv[1]
if name == "register":
    Path("STARTED").touch()
    while Path("HOLD").exists():
        time.sleep(0.1)
    for d in ("reports", "metrics"):
        Path(d).mkdir(exist_ok=True)
    Path("reports/train.json").write_text(json.dumps({"run_id": "abc123"}))
    Path("metrics/holdout.json").write_text(json.dumps({"roc_auc": 0.81, "rows": 10}))
    Path("reports/register.json").write_text(json.dumps({
        "model_name": "churn-classifier", "version": "1",
        "promoted": True, "reason": "no champion yet"}))
"""


@pytest.fixture(scope="module", autouse=True)
def harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=PREFECT_STARTUP_TIMEOUT):
        yield


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A DVC project whose one stage stands in for the pipeline, with a registered model."""
    (tmp_path / "step.py").write_text(STEP)
    stages = {"register": {"cmd": f"{sys.executable} step.py register", "always_changed": True}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    subprocess.run(
        [sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True
    )
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["retrain"] = {"cooldown_minutes": 30}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / ".mlops"))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    get_settings.cache_clear()
    client = registry.connect(get_settings())
    client.create_registered_model(NAME)
    client.create_model_version(NAME, source=(tmp_path / "m").as_uri(), run_id=None)
    yield tmp_path
    get_settings.cache_clear()


def _client() -> MlflowClient:
    return registry.connect(get_settings())


def test_a_second_retrain_of_a_running_model_is_skipped_then_the_cooldown_skips_a_third(
    project: Path,
) -> None:
    (project / "HOLD").touch()
    first: list[State] = []
    running = threading.Thread(
        target=lambda: first.append(retrain(project_dir=str(project), return_state=True))
    )
    running.start()
    try:
        deadline = time.monotonic() + 60
        while not (project / "STARTED").exists():
            assert time.monotonic() < deadline, "the first retrain never reached training"
            time.sleep(0.1)

        second = retrain(project_dir=str(project), return_state=True)
    finally:
        (project / "HOLD").unlink()
        running.join(timeout=120)

    assert first[0].is_completed()
    assert first[0].result() is True
    first_run = str(first[0].state_details.flow_run_id)
    assert second.name == "Skipped"
    assert second.result() is False
    assert second.message is not None
    assert f"retrain of {NAME} already running since" in second.message
    assert f"(flow run {first_run})" in second.message

    ended = retrain_guard.last_end(_client(), NAME)
    assert ended is not None
    assert datetime.now(UTC) - ended < timedelta(minutes=1)
    third = retrain(project_dir=str(project), return_state=True)
    until = (ended + timedelta(minutes=30)).isoformat(timespec="seconds")
    assert third.name == "Skipped"
    assert third.message is not None
    assert f"cooldown (30 min) until {until}" in third.message


def test_force_retrains_within_the_cooldown(project: Path) -> None:
    earlier = datetime.now(UTC) - timedelta(minutes=5)
    retrain_guard.record_end(_client(), NAME, at=earlier)

    assert retrain(project_dir=str(project), force=True) is True

    ended = retrain_guard.last_end(_client(), NAME)
    assert ended is not None
    assert ended > earlier


def test_a_retrain_after_the_cooldown_runs(project: Path) -> None:
    retrain_guard.record_end(_client(), NAME, at=datetime.now(UTC) - timedelta(minutes=31))

    assert retrain(project_dir=str(project)) is True
