"""The labelled production rows retraining adds: exported into the DVC project, or why not.

The prediction log is replaced by a fixed frame (its SQL is tested against a real
PostgreSQL in tests/integration); `dvc add` is real, in a throwaway DVC project.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

from common import production
from common.params import DataParams
from common.settings import Settings
from common.store import monitoring, roles


@pytest.fixture
def project(tmp_path: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True
    )
    return tmp_path


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(MLOPS_HOME=tmp_path / ".mlops")


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> list[pd.DataFrame]:
    """A prediction log that exists and holds the frames appended to the returned list."""
    frames: list[pd.DataFrame] = []

    @contextmanager
    def database(_settings: Settings, *, reuse_running: bool, role: str | None) -> Iterator[str]:
        assert reuse_running  # a predictor may be serving from the same embedded database
        assert role == roles.FLOWS  # not the superuser: row-level security holds
        yield "postgresql://log"

    monkeypatch.setattr(production, "has_prediction_db", lambda _settings: True)
    monkeypatch.setattr(production, "prediction_db", database)
    monkeypatch.setattr(monitoring, "labelled_rows", lambda _url, _name, _data: frames[-1])
    return frames


def test_labelled_rows_are_written_and_tracked_by_dvc(
    project: Path, data_params: DataParams, settings: Settings, logged: list[pd.DataFrame]
) -> None:
    logged.append(pd.DataFrame({"customer_id": ["a", "b"], "age": [30.0, 41.0], "churned": [0, 1]}))
    lines: list[str] = []

    done = production.export(project, data_params, settings, lines.append)

    assert data_params.production_dir
    path = project / data_params.production_dir / production.PRODUCTION_FILE
    assert (done.rows, done.path) == (2, path)
    assert done.note == f"2 labelled production rows -> {path.relative_to(project)}"
    pd.testing.assert_frame_equal(pd.read_parquet(path), logged[-1])
    assert path.with_name(f"{path.name}.dvc").is_file()


def test_no_labelled_rows_exports_nothing(
    project: Path, data_params: DataParams, settings: Settings, logged: list[pd.DataFrame]
) -> None:
    logged.append(pd.DataFrame({"customer_id": [], "churned": []}))

    done = production.export(project, data_params, settings, print)

    assert (done.rows, done.path) == (0, None)
    assert "no labelled production rows yet" in done.note
    assert not (project / "data").exists()


def test_without_a_prediction_log_training_uses_the_raw_table(
    project: Path, data_params: DataParams, settings: Settings
) -> None:
    done = production.export(project, data_params, settings, print)

    assert (done.rows, done.path) == (0, None)
    assert done.note.startswith("no prediction log (DATABASE_URL unset")


def test_without_a_production_dir_training_uses_the_raw_table(
    project: Path, data_params: DataParams, settings: Settings, logged: list[pd.DataFrame]
) -> None:
    data = data_params.model_copy(update={"production_dir": None})

    done = production.export(project, data, settings, print)

    assert (done.rows, done.note) == (
        0,
        "data.production_dir is not set: training on the raw table only",
    )
