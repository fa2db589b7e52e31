"""The closed loop of `make demo`, smaller, in a project copy on the embedded default.

dvc repro (the shared v1, and acme's own v1 from acme's own data) -> serve -> two tenants,
each with its own key and traffic: acme answered by its own model, globex by the shared
one; globex can neither label nor read acme's predictions -> calm traffic -> monitor per
tenant: no drift -> acme's traffic drifts, with late labels -> monitor per tenant: drift in
acme's only -> retrain acme on its labelled rows -> acme's gate makes v2 a canary's
challenger -> jobs -> the rollout flow ramps v2 10 -> 50 -> 100% on acme's live, labelled
traffic and promotes it -> the running service answers acme with v2 and globex with the
shared v1 throughout, no failed request; acme v2's lineage leads back to its data and to
the report that set it off; `make rollback` returns acme to v1.
"""

from __future__ import annotations

import json
import shutil
import sys
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
    name: {
        "aliases": {k: str(v) for k, v in c.get_registered_model(name).aliases.items()},
        "tags": {
            str(v.version): dict(v.tags) for v in c.search_model_versions(f"name='{name}'")
        },
    }
    for name in (s.model_name, registry.model_name(s, "acme"))
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
        overrides={
            "generate": {"rows": 8000, "tenant_sources": {"acme": 4000}},
            "monitor": {"report_rows": 3000, "min_rows": 500},  # 750 calm rows a tenant
            "tenants": {
                "acme": {
                    "source": {"path": "data/sources/acme.parquet"},
                    # as params.yaml's acme: new versions go through a canary
                    "rollout": {
                        "canary": True,
                        "min_samples": 60,
                        "min_labels": 40,
                        "poll_seconds": 1,
                        "step_timeout_seconds": 240,
                    },
                }
            },
        },
    )
    for name in ("flows", "scripts", "services"):
        shutil.copytree(ROOT / name, ws.path / name, ignore=shutil.ignore_patterns("__pycache__"))
    ws.env |= {
        "MLOPS_HOME": str(home),
        "PREFECT_HOME": str(ws.path / ".prefect"),
        "MODEL_POLL_SECONDS": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }
    ws.run("dvc", "repro", timeout=1500)  # minutes under a loaded 4-worker suite
    out = ws.run(  # the whole loop, canary included: minutes on a loaded 2-core machine
        sys.executable,
        "-m",
        "scripts.loop",
        *("--port", str(free_port())),
        *("--calm-rows", "1500", "--drift-rows", "3000", "--json", "loop.json"),
        timeout=2700,
    ).stdout
    return ws, json.loads((ws.path / "loop.json").read_text()), out


SHARED, ACME = "churn-classifier", "churn-classifier.acme"


def registry_state(ws: Workspace) -> dict[str, Any]:
    """Aliases and version tags of the shared model and of acme's."""
    return dict(json.loads(ws.python("-c", REGISTRY).stdout.strip().splitlines()[-1]))


def test_acme_is_served_its_own_model_and_globex_the_shared_champion(
    loop: tuple[Workspace, dict[str, Any], str],
) -> None:
    _, result, out = loop
    assert result["served"] == {"acme": f"{ACME} v1", "globex": f"{SHARED} v1"}
    assert result["own_model"] == {"acme": True, "globex": False}
    assert f"acme: {ACME} v1 (its own model)" in out
    assert f"globex: {SHARED} v1 (the shared champion)" in out


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


def test_calm_traffic_is_not_flagged_for_either_tenant(
    loop: tuple[Workspace, dict[str, Any], str],
) -> None:
    _, result, _ = loop
    for tenant, model in (("acme", ACME), ("globex", SHARED)):
        calm = result["calm"][tenant]
        assert calm["tenant_id"] == tenant
        assert calm["model_name"] == model
        assert calm["enough_rows"] is True, tenant
        assert calm["drift_detected"] is False, tenant


def test_only_acmes_drifted_traffic_is_flagged_with_its_late_labels(
    loop: tuple[Workspace, dict[str, Any], str],
) -> None:
    _, result, out = loop
    acme, globex = result["drifted"]["acme"], result["drifted"]["globex"]
    assert acme["drift_detected"] is True
    assert acme["labelled_rows"] == 2400
    assert globex["drift_detected"] is False
    assert globex["labelled_rows"] == 0
    assert "DRIFT" in out


def test_drift_retrains_acme_alone_and_a_canary_promotes_it_without_failures(
    loop: tuple[Workspace, dict[str, Any], str],
) -> None:
    ws, result, out = loop
    assert result["retrained"] == ["acme"]
    assert result["promoted"] is True, result
    assert (result["first_version"], result["new_version"]) == ("1", "2")
    assert result["swap_seconds"] is not None
    assert result["failed"] == 0
    assert result["requests"] > 20
    assert result["old_after_swap"] == 0
    assert result["others_kept"] == {"globex": ["1"]}  # globex: the shared v1 throughout
    canary = result["canary"]
    assert (canary["model_name"], canary["champion"], canary["challenger"]) == (ACME, "1", "2")
    assert canary["outcome"] == "promoted", canary
    assert [(s["weight"], s["action"]) for s in canary["steps"]] == [
        (10, "advance"),
        (50, "advance"),
        (100, "promote"),
    ]
    last = canary["steps"][-1]
    assert last["challenger"]["labelled"] >= 40
    assert last["champion"]["labelled"] >= 40
    assert canary["failed"] == 0
    assert canary["answered"]["challenger v2"] > 0
    assert canary["answered"]["champion v1"] > 0
    steps = ["1. serving", "2. ", "3. ", "4. drift in acme", "5. a job", "6. canary"]
    positions = [out.index(s) for s in steps]
    assert positions == sorted(positions)
    text = " ".join(out.split())
    assert "rollout churn-classifier.acme: step 1/3 at 10%: advance" in text
    assert "| accuracy |" in out  # the per-variant numbers, printed at every step
    state = registry_state(ws)
    assert state[ACME]["aliases"]["champion"] == "2"
    assert "challenger" not in state[ACME]["aliases"]
    v2 = state[ACME]["tags"]["2"]
    assert v2["gate.decision"] == "canary"
    assert v2["promote.decision"] == "promoted"
    assert v2["alias.champion.previous"] == "1"
    assert json.loads(v2["rollout.step.3"])["action"] == "promote"
    assert state[SHARED]["aliases"]["champion"] == "1"  # the shared model was not retrained
    assert set(state[SHARED]["tags"]) == {"1"}


def test_acme_v2_leads_back_to_its_data_and_the_report_that_triggered_it(
    loop: tuple[Workspace, dict[str, Any], str],
) -> None:
    ws, result, _ = loop
    tags = registry_state(ws)[ACME]["tags"]["2"]
    assert tags["tenant"] == "acme"
    assert tags["retrain.monitor_run"] == result["drifted"]["acme"]["mlflow_run_id"]
    assert tags["retrain.report"].endswith("/monitoring/report.html")
    # every labelled prediction of acme's: the drifted window's and the 3 the first answers sent
    assert int(tags["data.production_rows"]) >= result["drifted"]["acme"]["labelled_rows"]
    assert len(tags["dvc.raw_md5"]) == 32
    assert tags["gate.decision"] == "canary"  # the gate passed it; the canary promoted it
    assert tags["prefect.flow_run_id"]
    # acme's production rows are versioned with DVC beside its snapshot, not the shared ones
    assert list((ws.path / "data/tenants/acme/production").glob("*.dvc"))
    assert not (ws.path / "data/production/labelled.parquet.dvc").exists()
    report = Path(tags["retrain.report"].removeprefix("file://"))
    assert report.is_file()
    assert report.stat().st_size > 10_000


def test_every_window_is_kept_in_postgres_and_the_evidently_workspace(
    loop: tuple[Workspace, dict[str, Any], str], home: Path
) -> None:
    _, result, _ = loop
    assert result["monitoring_runs"] == 4  # two windows, one run per tenant each
    for tenant in ("acme", "globex"):
        project = result["drifted"][tenant]["evidently_project"]
        assert project == result["calm"][tenant]["evidently_project"]
        assert (home / "evidently" / project).is_dir()
    assert (
        result["drifted"]["acme"]["evidently_project"]
        != (result["drifted"]["globex"]["evidently_project"])
    )


def test_each_tenants_job_is_scored_by_workers_with_the_model_serving_it(
    loop: tuple[Workspace, dict[str, Any], str],
) -> None:
    _, result, out = loop
    jobs = {job["tenant"]: job for job in result["jobs"]}
    assert set(jobs) == {"acme", "globex"}
    for tenant, model in (("acme", f"{ACME} v1"), ("globex", f"{SHARED} v1")):
        job = jobs[tenant]
        assert job["status"] == "done", job
        assert job["records"] == job["scored"] == 300
        assert job["models"] == [model]  # the champions: acme's v2 is still a canary's challenger
    assert out.index("5. a job of 300 records per tenant") > out.index("4. ")
    text = " ".join(out.split())
    assert f"acme: job {jobs['acme']['job_id'][:8]}, 300 records scored by {ACME} v1" in text


def test_after_the_loop_one_command_rolls_acme_back_and_says_when_it_cannot(
    loop: tuple[Workspace, dict[str, Any], str],
) -> None:
    """Last in this module: it moves acme's champion (the canary promoted v2 in the loop)."""
    ws, _, _ = loop
    before = registry_state(ws)[ACME]["tags"]["2"]
    assert before["alias.champion.previous"] == "1"  # the canary's move records where to go back

    moved = ws.python("-m", "flows.promote", "rollback", "--tenant", "acme")
    assert f"{ACME}: champion v2 -> v1" in " ".join((moved.stdout + moved.stderr).split())
    after = registry_state(ws)[ACME]
    assert after["aliases"]["champion"] == "1"
    assert after["tags"]["2"]["promote.decision"] == "rolled back"
    assert registry_state(ws)[SHARED]["aliases"]["champion"] == "1"  # the shared one untouched

    again = ws.python("-m", "flows.promote", "rollback", "--tenant", "acme", check=False)
    assert again.returncode == 1
    assert "no earlier champion" in again.stderr
    assert "Traceback" not in again.stderr
