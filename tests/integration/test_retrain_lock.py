"""The retrain lock of the full stack (DATABASE_URL set): a PostgreSQL advisory lock that
names its holder to a second retrain and is freed when its holder dies."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from common import retrain_guard
from common.localpg import LocalPostgres
from common.settings import Settings

MODEL = "churn-classifier.acme"

HOLD = """\
import sys, time
from datetime import timedelta
from mlflow.tracking import MlflowClient
from common import retrain_guard
from common.settings import Settings

settings = Settings(DATABASE_URL=sys.argv[1], MLOPS_HOME=sys.argv[2])
client = MlflowClient(tracking_uri=sys.argv[3], registry_uri=sys.argv[3])
with retrain_guard.turn(settings, client, sys.argv[4], "crashing-run", cooldown=timedelta(0)) as t:
    print("skipped" if t.skipped else "held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def stack(postgres: LocalPostgres, tmp_path: Path) -> tuple[Settings, MlflowClient]:
    postgres.create_database("retrain_lock")
    settings = Settings(DATABASE_URL=postgres.url("retrain_lock"), MLOPS_HOME=tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # registry_uri too: another module's registry.connect may have set the process's one
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(MODEL)
    return settings, client


def test_a_second_retrain_on_another_connection_is_told_who_holds_the_model(
    stack: tuple[Settings, MlflowClient],
) -> None:
    settings, client = stack
    week = timedelta(days=7)
    with retrain_guard.turn(settings, client, MODEL, "run-a", cooldown=week) as first:
        assert first.skipped is None
        with retrain_guard.turn(settings, client, MODEL, "run-b", cooldown=week) as second:
            assert second.skipped is not None
            assert f"retrain of {MODEL} already running since " in second.skipped
            assert second.skipped.endswith("(flow run run-a)")
        with retrain_guard.turn(
            settings, client, "churn-classifier", "run-c", cooldown=week
        ) as other:
            assert other.skipped is None  # another model is not held
    assert retrain_guard.last_end(client, MODEL) is not None
    with retrain_guard.turn(settings, client, MODEL, "run-d", cooldown=week) as later:
        assert later.skipped is not None
        assert "cooldown (10080 min) until " in later.skipped
        assert f"skipped: {MODEL} was retrained at " in later.skipped


def test_a_retrain_that_dies_frees_the_model(
    stack: tuple[Settings, MlflowClient], tmp_path: Path
) -> None:
    settings, client = stack
    assert settings.database_url is not None
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [settings.database_url, str(tmp_path), tracking, MODEL]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, *args], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with retrain_guard.turn(settings, client, MODEL, "run-b", cooldown=timedelta(0)) as t:
            assert t.skipped is not None
            assert t.skipped.endswith("(flow run crashing-run)")
    finally:
        holder.kill()
        holder.wait(timeout=30)

    with retrain_guard.turn(settings, client, MODEL, "run-c", cooldown=timedelta(0)) as t:
        assert t.skipped is None
