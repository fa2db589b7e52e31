"""Monitoring snapshots as users meet them: a real `evidently ui` serving the workspace.

Two windows go into a workspace directory through `add_snapshot` (the first labelled,
so it brings a performance snapshot too); the UI started on that directory lists them
and charts them. Uploading through the UI's URL (RemoteWorkspace) reaches the same place.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from watchdog.events import (
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_MODIFIED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from common.evidently_store import add_snapshot, dashboard_panels
from common.params import MonitorParams, load_params
from models.generate import Drift, generate
from models.report import MonitorReport, evidently_performance, evidently_report
from tests.servers import VENV_BIN, Server, clean_env, free_port, http_ok

pytestmark = pytest.mark.integration

DATA = load_params().data
PROJECT = "churn-classifier monitoring"
T0 = datetime(2026, 11, 1, 12)
PANELS = {p.title for p in dashboard_panels(("predicted", "proba_1"))}


def scored(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    """A stand-in model: a noisy probability that knows the label, thresholded at 0.5."""
    noise = np.random.default_rng(seed).random(len(df))
    proba = np.clip(0.45 * df["churned"] + 0.6 * noise, 0, 1)
    return df.assign(proba_1=proba, predicted=(proba >= 0.5).astype(int))


@dataclass(frozen=True)
class Windows:
    labelled: MonitorReport
    unlabelled: MonitorReport


@pytest.fixture(scope="module")
def windows() -> Windows:
    reference = scored(generate(1500, seed=1), seed=1)
    first = scored(generate(1200, seed=2), seed=2)
    second = scored(generate(1200, seed=3, drift=Drift(covariate={"age": 1.0})), seed=3)
    second["churned"] = np.nan  # no feedback yet
    params = MonitorParams()
    return Windows(
        evidently_report(reference, first, DATA, params, timestamp=T0),
        evidently_report(reference, second, DATA, params, timestamp=T0 + timedelta(days=1)),
    )


@dataclass(frozen=True)
class Ui:
    url: str
    workspace: Path
    project_id: str


@pytest.fixture(scope="module")
def ui(
    windows: Windows, tmp_path_factory: pytest.TempPathFactory, server_logs: Path
) -> Iterator[Ui]:
    """`evidently ui` on a workspace that `add_snapshot` wrote two windows to."""
    workspace = tmp_path_factory.mktemp("evidently") / "workspace"  # add_snapshot creates it
    ids = {
        add_snapshot(str(workspace), PROJECT, windows.labelled, description="window 1"),
        add_snapshot(str(workspace), PROJECT, windows.unlabelled, description="window 2"),
    }
    assert len(ids) == 1, "the second window must reuse the project"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(VENV_BIN / "evidently"), "ui", "--workspace", str(workspace)]
    server = Server(
        "evidently ui",
        [*cmd, "--host", "127.0.0.1", "--port", str(port)],
        log_path=server_logs / "evidently-ui.log",
        healthy=http_ok(f"{url}/api/version"),
        env=clean_env(DO_NOT_TRACK="1"),
    )
    with server.start():
        yield Ui(url, workspace, ids.pop())


def get(url: str) -> Any:
    response = httpx.get(url, timeout=30)
    response.raise_for_status()
    return response.json()


def series(ui_url: str, project_id: str) -> dict[str, list[dict[str, Any]]]:
    """Each dashboard panel's series, fetched the way the UI's charts fetch them."""
    out = {}
    for panel in get(f"{ui_url}/api/v2/dashboards/{project_id}")["panels"]:
        filters = [
            {k: v[k] for k in ("tags", "metadata", "metric", "metric_labels")}
            for v in panel["values"]
        ]
        response = httpx.post(
            f"{ui_url}/api/v2/snapshots/{project_id}/data_series_batch",
            json={"series_filter": filters},
            timeout=30,
        )
        response.raise_for_status()
        out[panel["title"]] = response.json()["series"]
    return out


def test_the_ui_lists_the_project_with_each_windows_snapshots(ui: Ui) -> None:
    projects = [p for p in get(f"{ui.url}/api/projects") if p["name"] == PROJECT]
    assert [p["id"] for p in projects] == [ui.project_id]
    snapshots = get(f"{ui.url}/api/projects/{ui.project_id}/snapshots")
    assert sorted(s["name"] for s in snapshots) == [
        "window 1 (drift)",
        "window 1 (performance)",
        "window 2 (drift)",
    ]
    by_name = {s["name"]: s for s in snapshots}
    assert by_name["window 1 (performance)"]["metadata"]["labelled_rows"] == "1200"
    assert by_name["window 2 (drift)"]["metadata"]["labelled_rows"] == "0"
    assert by_name["window 1 (performance)"]["tags"] == ["performance"]


def test_the_dashboard_charts_drift_predictions_and_quality_over_time(
    ui: Ui, windows: Windows
) -> None:
    dashboard = get(f"{ui.url}/api/v2/dashboards/{ui.project_id}")
    assert len(dashboard["tabs"]) == 1  # Evidently OSS keeps one tab
    assert [p["title"] for p in dashboard["panels"]] == [
        p.title for p in dashboard_panels(("predicted", "proba_1"))
    ]
    charts = series(ui.url, ui.project_id)
    assert set(charts) == PANELS
    assert [s["values"] for s in charts["Rows in window"]] == [[1200.0, 1200.0]]
    share = charts["Share of drifted features"][0]["values"]
    assert len(share) == 2
    assert share[1] > share[0]  # the second window's age moved
    assert {s["params"]["column"] for s in charts["Prediction drift score"]} == {
        "predicted",
        "proba_1",
    }
    quality = {
        s["metric_type"].rsplit(":", 1)[-1]: s["values"]
        for s in charts["Model quality on labelled rows"]
    }
    expected = evidently_performance(windows.labelled)
    assert expected is not None
    assert quality["Accuracy"] == [pytest.approx(expected["accuracy"])]
    assert quality["RocAuc"] == [pytest.approx(expected["roc_auc"])]
    assert [s["values"] for s in charts["Labelled rows"]] == [[1200.0]]
    assert len(charts["F1 by class"]) == 2


def test_windows_written_to_the_directory_while_the_ui_runs_show_up(
    ui: Ui, windows: Windows
) -> None:
    """The default mode: a monitor run writes to the directory `evidently ui` serves.

    evidently ui 0.7's watcher thread dies on the JSONDecodeError of a half-written
    metadata.json; add_snapshot renames each file in whole, so it never reads one. Before any
    upload through the URL: the UI writes an uploaded project's own metadata.json in place,
    which can end its watcher the same way (Evidently's bug, not a writer's to prevent).
    """
    name = f"{PROJECT} (written while serving)"
    project_id = add_snapshot(str(ui.workspace), name, windows.unlabelled, description="late")
    deadline = time.monotonic() + 90  # the UI rescans its directory: slow when busy
    snapshots: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not snapshots:
        if any(p["id"] == project_id for p in get(f"{ui.url}/api/projects")):
            snapshots = get(f"{ui.url}/api/projects/{project_id}/snapshots")
            if not snapshots:  # seen before its snapshot was written: what the UI's reload does
                httpx.get(f"{ui.url}/api/projects/{project_id}/reload", timeout=30)
        time.sleep(0.2)
    assert [s["name"] for s in snapshots] == ["late (drift)"]
    assert set(series(ui.url, project_id)) == PANELS


class Recorder(FileSystemEventHandler):
    def __init__(self) -> None:
        self.events: list[FileSystemEvent] = []

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.events.append(event)


def test_files_reach_a_directory_workspace_only_whole_by_a_rename(
    windows: Windows, tmp_path: Path
) -> None:
    """What a watching `evidently ui` sees of add_snapshot: each file created once, complete
    (a rename from outside the tree), never a file opened for writing inside it."""
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    handler = Recorder()
    observer = Observer()
    observer.schedule(handler, str(workspace), recursive=True)
    observer.start()
    try:
        add_snapshot(str(workspace), PROJECT, windows.labelled, description="window 1")
        add_snapshot(str(workspace), PROJECT, windows.unlabelled, description="window 2")
        time.sleep(1)  # let the observer drain its queue
    finally:
        observer.stop()
        observer.join()
    files = [e for e in handler.events if not e.is_directory]
    written = {e.event_type for e in files} & {EVENT_TYPE_MODIFIED, EVENT_TYPE_CLOSED}
    assert not written, [(e.event_type, e.src_path) for e in files]
    created = [Path(str(e.src_path)) for e in files if e.event_type == EVENT_TYPE_CREATED]
    assert sorted(p.name for p in created if p.parent.name == "snapshots") == sorted(
        p.name for p in workspace.glob("*/snapshots/*.json")
    )
    assert {p.name for p in created} >= {"metadata.json", "dashboard.json"}
    assert not list(tmp_path.glob(".*.tmp")), "a staged file was left beside the workspace"


def test_uploads_through_the_ui_url_create_then_reuse_a_project(ui: Ui, windows: Windows) -> None:
    name = f"{PROJECT} (uploaded)"
    first = add_snapshot(ui.url, name, windows.labelled, description="window 1")
    second = add_snapshot(f"{ui.url}/", name, windows.unlabelled.drift, description="window 2")
    assert first == second
    assert [p["id"] for p in get(f"{ui.url}/api/projects") if p["name"] == name] == [first]
    assert len(get(f"{ui.url}/api/projects/{first}/snapshots")) == 3
    charts = series(ui.url, first)
    assert set(charts) == PANELS
    assert len(charts["Share of drifted features"][0]["values"]) == 2


SECRET = "evidently-write-secret"


@pytest.fixture(scope="module")
def locked_ui(tmp_path_factory: pytest.TempPathFactory, server_logs: Path) -> Iterator[str]:
    """`evidently ui` started as the stack starts it: EVIDENTLY_SECRET in its environment."""
    workspace = tmp_path_factory.mktemp("evidently-locked") / "workspace"
    workspace.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = Server(
        "evidently ui (secret)",
        [str(VENV_BIN / "evidently"), "ui", "--workspace", str(workspace), "--port", str(port)],
        log_path=server_logs / "evidently-ui-locked.log",
        healthy=http_ok(f"{url}/api/version"),
        env=clean_env(DO_NOT_TRACK="1", EVIDENTLY_SECRET=SECRET),
    )
    with server.start():
        yield url


def test_a_ui_with_a_secret_refuses_writes_without_it_and_keeps_reads_open(
    locked_ui: str, windows: Windows
) -> None:
    project = {"name": "intruder", "description": "", "dashboard": {"name": "", "panels": []}}
    for headers in ({}, {"evidently-secret": "wrong"}):
        refused = httpx.post(f"{locked_ui}/api/projects", json=project, headers=headers)
        assert refused.status_code == 403, refused.text
    with pytest.raises(Exception, match="Not enough permissions"):  # its 403
        add_snapshot(locked_ui, PROJECT, windows.labelled, description="anonymous")
    assert get(f"{locked_ui}/api/projects") == []  # reading needs no secret (Evidently OSS)


def test_uploads_with_the_secret_reach_a_locked_ui(locked_ui: str, windows: Windows) -> None:
    project_id = add_snapshot(locked_ui, PROJECT, windows.labelled, secret=SECRET)
    assert [p["id"] for p in get(f"{locked_ui}/api/projects")] == [project_id]
    assert len(get(f"{locked_ui}/api/projects/{project_id}/snapshots")) == 2
