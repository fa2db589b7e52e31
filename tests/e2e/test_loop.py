"""The closed loop of `make demo`, smaller, in a project copy on the embedded default.

dvc repro (v1) -> serve -> two tenants (acme, globex), each with its own key and traffic;
globex can neither label nor read acme's predictions -> calm traffic -> monitor: no drift
-> drifted traffic with late labels -> monitor: drift -> retrain on the labelled rows ->
gate -> v2 champion -> the running service answers with v2, no failed request; v2's
lineage leads back to its data and to the monitoring report that set it off.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import free_port
from tests.workspace import ROOT, Workspace, make_workspace

pytestmark = pytest.mark.e2e

REGISTRY = """
import json
from common import registry
from common.settings import get_settings
s = get_settings()
c = registry.connect(s)
out = {
    "aliases": {k: str(v) for k, v in c.get_registered_model(s.model_name).aliases.items()},
    "tags": {
        str(v.version): dict(v.tags)
        for v in c.search_model_versions(f"name='{s.model_name}'")
    },
}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    """MLOPS_HOME where the `postgres` user can reach the embedded cluster (we may be root)."""
    path = Path(tempfile.mkdtemp(prefix="loop-home-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def loop(
    tmp_path_factory: pytest.TempPathFactory, home: Path
) -> tuple[Workspace, dict[str, Any], str]:
    ws = make_workspace(
        tmp_path_factory.mktemp("loop") / "ws",
        overrides={"generate": {"rows": 8000}, "monitor": {"report_rows": 3000}},
    )
    for name in ("flows", "scripts", "services"):
        shutil.copytree(ROOT / name, ws.path / name, ignore=shutil.ignore_patterns("__pycache__"))
    ws.env |= {
        "MLOPS_HOME": str(home),
        "PREFECT_HOME": str(ws.path / ".prefect"),
        "MODEL_POLL_SECONDS": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }
    ws.run("dvc", "repro", timeout=600)
    out = ws.python(
        "-m",
        "scripts.loop",
        *("--port", str(free_port())),
        *("--calm-rows", "1500", "--drift-rows", "3000", "--json", "loop.json"),
    ).stdout
    return ws, json.loads((ws.path / "loop.json").read_text()), out


def registry_state(ws: Workspace) -> dict[str, Any]:
    return dict(json.loads(ws.python("-c", REGISTRY).stdout.strip().splitlines()[-1]))


def test_globex_can_neither_label_nor_see_acmes_predictions(
    loop: tuple[Workspace, dict[str, Any], str],
) -> None:
    _, result, out = loop
    assert result["tenants"] == ["acme", "globex"]
    iso = result["isolation"]
    assert (iso["owner"], iso["other"]) == ("acme", "globex")
    assert iso["feedback_status"] == 404  # as for an unknown request id
    assert iso["read_status"] == 200
    assert (iso["own_rows"], iso["owner_rows"], iso["foreign_rows"]) == (750, 0, 0)
    assert iso["owner_total"] == 750
    text = " ".join(out.split())  # rich wraps long lines
    assert (
        "POST /feedback with globex's key on one of acme's request ids: HTTP 404: "
        "globex cannot label acme's predictions" in text
    )
    assert (
        "GET /predictions with globex's key: HTTP 200, 750 of globex's own rows, 0 of acme's "
        "750: globex cannot see acme's predictions" in text
    )
    assert "NOT ISOLATED" not in text


def test_the_demo_leaves_its_tenants_for_the_mlops_cli(
    loop: tuple[Workspace, dict[str, Any], str],
) -> None:
    ws, _, _ = loop
    listing = ws.python("-m", "common.cli", "tenants", "list").stdout
    rows = {line.split()[0]: line.split() for line in listing.splitlines()[1:]}
    assert {"acme", "globex", "default"} <= set(rows)
    assert rows["acme"][1] == rows["globex"][1] == "1"  # live keys: this run's only


def test_calm_traffic_is_not_flagged(loop: tuple[Workspace, dict[str, Any], str]) -> None:
    _, result, _ = loop
    assert result["calm"]["enough_rows"] is True
    assert result["calm"]["drift_detected"] is False


def test_drifted_traffic_is_flagged_with_its_late_labels(
    loop: tuple[Workspace, dict[str, Any], str],
) -> None:
    _, result, out = loop
    drifted = result["drifted"]
    assert drifted["drift_detected"] is True
    assert drifted["labelled_rows"] == 2400
    assert "DRIFT" in out


def test_retrain_promotes_v2_through_the_gate_and_the_service_swaps_without_failures(
    loop: tuple[Workspace, dict[str, Any], str],
) -> None:
    ws, result, out = loop
    assert result["promoted"] is True, result
    assert result["new_version"] == "2"
    assert result["swap_seconds"] is not None
    assert result["failed"] == 0
    assert result["requests"] > 20
    assert result["old_after_swap"] == 0
    steps = ["1. serving", "2. ", "3. ", "4. drift -> retrain", "5. v2 is champion"]
    positions = [out.index(s) for s in steps]
    assert positions == sorted(positions)
    assert registry_state(ws)["aliases"]["champion"] == "2"


def test_v2_leads_back_to_its_data_and_the_report_that_triggered_it(
    loop: tuple[Workspace, dict[str, Any], str],
) -> None:
    ws, result, _ = loop
    tags = registry_state(ws)["tags"]["2"]
    assert tags["retrain.monitor_run"] == result["drifted"]["mlflow_run_id"]
    assert tags["retrain.report"].endswith("/monitoring/report.html")
    # every labelled prediction: the drifted window's and the 3 the first answers sent
    assert int(tags["data.production_rows"]) == result["drifted"]["labelled_rows"] + 3
    assert len(tags["dvc.train_md5"]) == 32
    assert tags["gate.decision"] == "promoted"
    assert tags["prefect.flow_run_id"]
    # the production rows are versioned with DVC beside the raw table
    assert (ws.path / "data/production/labelled.parquet.dvc").is_file()
    report = Path(tags["retrain.report"].removeprefix("file://"))
    assert report.is_file()
    assert report.stat().st_size > 10_000


def test_every_window_is_kept_in_postgres_and_the_evidently_workspace(
    loop: tuple[Workspace, dict[str, Any], str], home: Path
) -> None:
    _, result, _ = loop
    assert result["monitoring_runs"] == 2
    project = result["drifted"]["evidently_project"]
    assert project == result["calm"]["evidently_project"]
    assert (home / "evidently" / project).is_dir()
