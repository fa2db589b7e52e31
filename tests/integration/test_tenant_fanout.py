"""Per-tenant fan-out on a real Prefect server and two real process workers.

A cheap deployment (`probe`: records which worker ran it, when, for which tenant) stands
in for `monitor` and `retrain`, with the same `concurrency_limit` shape as prefect.yaml's;
a parent flow queues one run per tenant through `flows.fanout.queue`, as `monitor_tenants`
and `retrain_tenants` do, and the two workers on one pool share them.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.servers import (
    Server,
    free_port,
    http_ok,
    log_tail,
    prefect_cli,
    prefect_server,
    run_ok,
)
from tests.workspace import ROOT

pytestmark = pytest.mark.integration

POOL = "fanout-process"
TENANTS = [f"tenant-{i}" for i in range(10)]
LIMIT = 2

PROBE = """
import json, os, time
from pathlib import Path
from prefect import flow

@flow(name="probe")
def probe(tenant: str | None = None) -> str:
    start = time.time()
    time.sleep(1)
    out = Path(os.environ["PROBE_OUT"]) / f"{tenant}.json"
    worker = os.environ["PROBE_WORKER"]
    out.write_text(json.dumps({"worker": worker, "start": start, "end": time.time()}))
    return worker
"""

FAN_OUT = """
import json, sys
from prefect import flow
from flows import fanout

@flow(name="probe_tenants")
def probe_tenants(tenants: list[str]) -> list[str]:
    return [str(fanout.queue("probe/probe", t, {}).id) for t in tenants]

print(json.dumps(probe_tenants(json.loads(sys.argv[1]))))
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The probe flow and a prefect.yaml deploying it like prefect.yaml's per-tenant flows."""
    root = tmp_path_factory.mktemp("fanout")
    (root / "probe.py").write_text(PROBE)
    (root / "out").mkdir()
    ours = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    limit = ours["definitions"]["per_tenant_limit"] | {"limit": LIMIT}
    spec = {
        "name": "fanout-test",
        "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": str(root)}}],
        "deployments": [
            {
                "name": "probe",
                "entrypoint": "probe.py:probe",
                "work_pool": {"name": POOL},
                "concurrency_limit": limit,
            }
        ],
    }
    (root / "prefect.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def prefect_env(project: Path) -> Iterator[dict[str, str]]:
    """`prefect server start` on a free port, the pool and the probe deployment; its env."""
    home = project / "prefect-home"
    home.mkdir()
    with prefect_server(home, PROBE_OUT=str(project / "out"), PYTHONPATH=str(ROOT)) as env:
        prefect_cli(env, project, "work-pool", "create", POOL, "--type", "process")
        prefect_cli(env, project, "--no-prompt", "deploy", "--all")
        yield env


def _worker(env: dict[str, str], project: Path, name: str) -> Server:
    """A process worker on the pool that runs one flow run at a time (`--limit 1`)."""
    port = free_port()
    return Server(
        f"prefect worker {name}",
        [
            *(sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL),
            *("--name", name, "--limit", "1", "--with-healthcheck"),
        ],
        log_path=project / f"{name}.log",
        healthy=http_ok(f"http://127.0.0.1:{port}/health"),
        env=env
        | {
            "PROBE_WORKER": name,
            "PREFECT_WORKER_WEBSERVER_PORT": str(port),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
        },
        cwd=project,
    )


def _states(env: dict[str, str], ids: list[str]) -> dict[str, str]:
    api = env["PREFECT_API_URL"]
    runs = httpx.post(
        f"{api}/flow_runs/filter", json={"flow_runs": {"id": {"any_": ids}}}, timeout=30
    ).json()
    return {r["id"]: r["state_type"] for r in runs}


def test_two_process_workers_on_one_pool_share_ten_queued_per_tenant_runs(
    prefect_env: dict[str, str], project: Path
) -> None:
    queued = run_ok(
        [sys.executable, "-c", FAN_OUT, json.dumps(TENANTS)],
        cwd=project,
        env=prefect_env,
        timeout=120,
    )
    ids: list[str] = json.loads(queued.strip().splitlines()[-1])
    assert len(set(ids)) == len(TENANTS)  # queued, not run: the parent returned at once

    with _worker(prefect_env, project, "w1"), _worker(prefect_env, project, "w2"):
        deadline = time.monotonic() + 900
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = _states(prefect_env, ids)
            if all(s in ("COMPLETED", "FAILED", "CRASHED") for s in states.values()):
                break
            time.sleep(1)
    logs = "\n".join(log_tail(project / f"{w}.log", 30) for w in ("w1", "w2"))
    assert sorted(states.values()) == ["COMPLETED"] * len(TENANTS), f"{states}\n{logs}"

    runs: dict[str, dict[str, Any]] = {
        t: json.loads((project / "out" / f"{t}.json").read_text()) for t in TENANTS
    }
    by_worker = {w: sum(r["worker"] == w for r in runs.values()) for w in ("w1", "w2")}
    assert all(n >= 1 for n in by_worker.values()), by_worker  # both took a share
    # never more at once than the deployment's concurrency limit
    most = max(
        sum(r["start"] <= run["start"] < r["end"] for r in runs.values()) for run in runs.values()
    )
    assert most <= LIMIT
