"""Tests start from the project's files only, whatever a user's own runs left in the checkout.

`make demo` then `make test` in one clone: the demo's retrain writes labelled production rows
(and their .dvc files), `dvc repro` writes dvc.lock and outputs, the embedded store lives in
.mlops/, and a user may export MLFLOW_TRACKING_URI or DATABASE_URL. A copy of the checkout
with all of that planted must give the same test workspace as a clean one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.workspace import COPIED, EMPTY_DIRS, ROOT, USER_VARIABLES, make_workspace

PLANTED = (
    "data/production/labelled.parquet",
    "data/production/labelled.parquet.dvc",
    "data/production/.gitignore",
    ".mlops/mlflow.db",
    ".mlops/evidently/metadata.json",
    "dvc.lock",
    "data/raw/customers.parquet",
    "data/prepared/train.parquet",
    "metrics/holdout.json",
    "plots/roc.csv",
    "reports/register.json",
)


@pytest.fixture
def used_checkout(tmp_path: Path) -> Path:
    """The project's files, plus what `make demo` leaves behind."""
    checkout = tmp_path / "checkout"
    for name in (*COPIED, *(f"{d}/{f}" for d, f in EMPTY_DIRS.items())):
        src, dest = ROOT / name, checkout / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest)
    for name in PLANTED:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_text("left by a user's run")
    return checkout


def test_a_workspace_copies_none_of_what_a_users_runs_left(
    used_checkout: Path, tmp_path: Path
) -> None:
    ws = make_workspace(tmp_path / "ws", root=used_checkout)

    for name in PLANTED:
        assert not (ws.path / name).exists(), f"{name} reached the test workspace"
    assert sorted(p.name for p in (ws.path / "data/production").iterdir()) == ["README.md"]


def test_commands_in_a_workspace_run_without_the_users_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in USER_VARIABLES:
        monkeypatch.setenv(name, "http://users-own-server:5000")
    ws = make_workspace(tmp_path / "ws")

    names = sorted(USER_VARIABLES)
    script = f"import json, os; print(json.dumps({{k: os.environ.get(k) for k in {names}}}))"
    seen = json.loads(ws.run(sys.executable, "-c", script).stdout)

    assert seen.pop("MLOPS_HOME") == str(ws.path / ".mlops")
    assert seen == dict.fromkeys(seen)  # every other one unset


def test_the_suite_runs_without_the_users_settings_or_store() -> None:
    """tests/conftest.py drops them at start; MLOPS_HOME is a fresh directory, not .mlops/."""
    home = Path(os.environ["MLOPS_HOME"])
    assert not home.is_relative_to(ROOT)
    for name in ("EVIDENTLY_WORKSPACE", "PREFECT_API_URL", "MLOPS_PROJECT_DIR"):
        assert name not in os.environ, name
