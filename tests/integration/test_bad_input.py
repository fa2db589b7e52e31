"""Bad input through the real pipeline: one clear paragraph, non-zero exit, registry untouched.

One workspace for the module: `dvc repro` once on good data makes champion v1; then each
bad file is pointed at by data.path and `dvc repro` must stop before anything is trained.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.workspace import Workspace, make_workspace

MODEL = "churn-classifier"
BAD_ROWS = [10, 20, 30]
"""0-based positions in the raw table; prepare numbers rows from 1, so reports say 11, 21, 31."""


@dataclass(frozen=True)
class Registry:
    """What a failed run must not change: versions, aliases and the number of MLflow runs."""

    versions: tuple[str, ...]
    aliases: dict[str, str]
    runs: int


def registry_state(ws: Workspace) -> Registry:
    uri = f"sqlite:///{ws.path / '.mlops' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions(f"name='{MODEL}'")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return Registry(
        versions=tuple(sorted(str(v.version) for v in versions)),
        aliases={k: str(v) for k, v in client.get_registered_model(MODEL).aliases.items()},
        runs=len(client.search_runs(experiments, max_results=1000)),
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    ws = make_workspace(tmp_path_factory.mktemp("bad-input"))
    ws.run("dvc", "repro")
    return ws


@pytest.fixture(scope="module")
def good_path(workspace: Workspace) -> str:
    return str(workspace.params()["data"]["path"])


@pytest.fixture(scope="module")
def raw(workspace: Workspace, good_path: str) -> pd.DataFrame:
    return pd.read_parquet(workspace.path / good_path)


@pytest.fixture(scope="module")
def before(workspace: Workspace) -> Registry:
    state = registry_state(workspace)
    assert state.versions == ("1",)
    assert state.aliases == {"champion": "1"}
    return state


Make = Callable[[pd.DataFrame], pd.DataFrame | bytes]
"""Turns the good raw table into a bad file's content: a table to write as CSV, or bytes."""


@pytest.fixture
def use_input(
    workspace: Workspace, raw: pd.DataFrame, good_path: str
) -> Iterator[Callable[[Make], str]]:
    """Write a bad file under data/incoming/, point data.path at it; restore it afterwards."""

    def use(make: Make) -> str:
        path = f"data/incoming/{make.__name__}.csv"
        target = workspace.path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        content = make(raw)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            content.to_csv(target, index=False)
        workspace.set_params({"data": {"path": path}})
        return path

    yield use
    workspace.set_params({"data": {"path": good_path}})


def missing_column(df: pd.DataFrame) -> pd.DataFrame | bytes:
    return df.drop(columns="monthly_charges")


def wrong_dtype(df: pd.DataFrame) -> pd.DataFrame | bytes:
    df = df.astype({"tenure_months": object})
    df.loc[BAD_ROWS, "tenure_months"] = "twelve"
    return df


def out_of_range(df: pd.DataFrame) -> pd.DataFrame | bytes:
    df = df.copy()
    df.loc[BAD_ROWS, "age"] = 150.0
    return df


def unseen_category(df: pd.DataFrame) -> pd.DataFrame | bytes:
    df = df.copy()
    df.loc[BAD_ROWS, "region"] = "atlantis"
    return df


def empty_file(df: pd.DataFrame) -> pd.DataFrame | bytes:
    return b""


def not_a_table(df: pd.DataFrame) -> pd.DataFrame | bytes:
    return b"\x89PNG\r\n\x1a\n" + np.random.default_rng(0).bytes(8192)


def single_class(df: pd.DataFrame) -> pd.DataFrame | bytes:
    return df.assign(churned=0)


def case(make: Make, *names: str) -> Any:
    return pytest.param(make, list(names), id=make.__name__.replace("_", "-"))


@pytest.mark.parametrize(
    ("make", "names"),
    [
        case(missing_column, "column 'monthly_charges' [required column]"),
        case(wrong_dtype, "column 'tenure_months' [numeric type]", "row 11: 'twelve'"),
        case(out_of_range, "column 'age' [range 18..120]", "row 11: 150.0"),
        case(unseen_category, "column 'region' [allowed categories]", "row 11: 'atlantis'"),
        case(empty_file, "the file is empty"),
        case(not_a_table, "not a readable CSV file"),
        case(single_class, "column 'churned' [two or more classes]"),
    ],
)
def test_bad_input_stops_the_pipeline_and_leaves_the_registry_alone(
    make: Make,
    names: list[str],
    workspace: Workspace,
    before: Registry,
    use_input: Callable[[Make], str],
) -> None:
    path = use_input(make)

    proc = workspace.run("dvc", "repro", check=False)

    output = f"{proc.stdout}\n{proc.stderr}"
    assert proc.returncode != 0, output
    assert "Traceback" not in output
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    dvc_own = ("ERROR:", "WARNING:")
    stage = [x for x in proc.stderr.splitlines() if x.strip() and not x.startswith(dvc_own)]
    assert stage == errors, output  # the stage says one paragraph and nothing else
    assert path in errors[0]
    for name in names:
        assert name in errors[0], errors[0]
    assert "Running stage 'train'" not in output
    assert registry_state(workspace) == before


def test_pipeline_is_up_to_date_again_once_data_path_is_restored(
    workspace: Workspace, good_path: str, before: Registry
) -> None:
    assert workspace.params()["data"]["path"] == good_path
    proc = workspace.run("dvc", "repro")
    assert "Running stage 'train'" not in proc.stdout  # same data: nothing to retrain
    assert registry_state(workspace) == before
