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
from common.params import DataParams, Params
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
def asked() -> list[tuple[list[str], list[str] | None]]:
    """The (model names, tenants) each read of the log asked for."""
    return []


@pytest.fixture
def logged(
    monkeypatch: pytest.MonkeyPatch, asked: list[tuple[list[str], list[str] | None]]
) -> list[pd.DataFrame]:
    """A prediction log that exists and holds the frames appended to the returned list."""
    frames: list[pd.DataFrame] = []

    def labelled_rows(
        _url: str, names: list[str], _data: DataParams, tenants: list[str] | None = None
    ) -> pd.DataFrame:
        asked.append((list(names), None if tenants is None else list(tenants)))
        return frames[-1]

    @contextmanager
    def database(_settings: Settings, *, reuse_running: bool, role: str | None) -> Iterator[str]:
        assert reuse_running  # a predictor may be serving from the same embedded database
        assert role == roles.FLOWS  # not the superuser: row-level security holds
        yield "postgresql://log"

    monkeypatch.setattr(production, "has_prediction_db", lambda _settings: True)
    monkeypatch.setattr(production, "prediction_db", database)
    monkeypatch.setattr(monitoring, "labelled_rows", labelled_rows)
    return frames


def test_labelled_rows_are_written_and_tracked_by_dvc(
    project: Path, data_params: DataParams, settings: Settings, logged: list[pd.DataFrame]
) -> None:
    logged.append(pd.DataFrame({"customer_id": ["a", "b"], "age": [30.0, 41.0], "churned": [0, 1]}))
    lines: list[str] = []
    data_params = data_params.model_copy(update={"production_tenants": ["default"]})

    done = production.export(project, data_params, settings, lines.append)

    assert data_params.production_dir
    path = project / data_params.production_dir / production.PRODUCTION_FILE
    assert (done.rows, done.path) == (2, path)
    assert done.note == f"2 labelled production rows of default -> {path.relative_to(project)}"
    pd.testing.assert_frame_equal(pd.read_parquet(path), logged[-1])
    assert path.with_name(f"{path.name}.dvc").is_file()


def test_no_labelled_rows_exports_nothing(
    project: Path, data_params: DataParams, settings: Settings, logged: list[pd.DataFrame]
) -> None:
    logged.append(pd.DataFrame({"customer_id": [], "churned": []}))
    data = data_params.model_copy(update={"production_tenants": ["default"]})

    done = production.export(project, data, settings, print)

    assert (done.rows, done.path) == (0, None)
    assert "no labelled production rows of default yet" in done.note
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


def test_the_shared_model_learns_only_from_the_tenants_that_consented(
    project: Path,
    data_params: DataParams,
    settings: Settings,
    logged: list[pd.DataFrame],
    asked: list[tuple[list[str], list[str] | None]],
) -> None:
    logged.append(pd.DataFrame({"customer_id": ["a"], "churned": [1]}))
    data = data_params.model_copy(update={"production_tenants": ["default", "acme"]})

    production.export(project, data, settings, print)

    # never None (every tenant): the read is scoped to the consenting tenants alone
    assert asked == [
        (
            ["churn-classifier", "churn-classifier.default", "churn-classifier.acme"],
            ["default", "acme"],
        )
    ]


def test_without_a_consenting_tenant_the_shared_model_reads_no_label(
    project: Path,
    data_params: DataParams,
    settings: Settings,
    logged: list[pd.DataFrame],
    asked: list[tuple[list[str], list[str] | None]],
) -> None:
    data = data_params.model_copy(update={"production_tenants": []})

    done = production.export(project, data, settings, print)

    assert (done.rows, asked) == (0, [])
    assert done.note == "data.production_tenants is empty: training on the raw table only"


def test_a_tenants_own_model_learns_from_that_tenants_rows_alone(
    project: Path,
    params: Params,
    settings: Settings,
    logged: list[pd.DataFrame],
    asked: list[tuple[list[str], list[str] | None]],
) -> None:
    logged.append(pd.DataFrame({"customer_id": ["a"], "churned": [1]}))
    source = {"path": "data/acme.parquet"}
    own = Params.model_validate(
        params.model_dump(by_alias=True) | {"tenants": {"acme": {"source": source}}}
    ).for_tenant("acme")

    done = production.export(project, own.data, settings, print)

    assert asked == [(["churn-classifier", "churn-classifier.acme"], ["acme"])]
    assert done.path == project / "data/tenants/acme/production" / production.PRODUCTION_FILE
