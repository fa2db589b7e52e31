"""Training 10 tenants: through a Prefect work pool (1 and 2 process workers) against one by one.

The per-tenant DVC pipeline (`pipeline(project_dir, tenant)`) is not merged yet, so each
tenant's run here is `train_tenant`, the training a tenant's pipeline does, callable now:
its own table (`generate`, a seed per tenant), the `prepare` split, `train.build` fitted,
`evaluate.score` on its holdout; no registry, no DVC. Two ways to train N tenants:

- one after another: `train_tenant` N times in one process (no Prefect at all: the floor);
- through the pool: N flow runs queued at once by `flows.fanout.queue` (as
  `retrain_tenants` queues them) on a `process` pool served by 1, then 2 workers, one run
  each at a time, under prefect.yaml's deployment `concurrency_limit`; timed from the first
  run queued to the last one completed, against a real `prefect server`. One worker shows
  what a flow run costs over a plain call (a process per run), two what the pool gains.

Run: `.venv/bin/python -m benchmarks.tenant_training [--tenants 10] [--rows 60000]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import zlib
from datetime import datetime
from pathlib import Path

import httpx
import yaml
from prefect import flow

from common.params import load_params
from models import evaluate, prepare, train
from models.data import model_frame, target
from models.generate import generate
from tests.servers import Server, clean_env, free_port, http_ok, run_ok
from tests.workspace import ROOT

POOL = "tenant-training"


@flow(name="train_tenant")
def train_tenant(tenant: str | None = None, rows: int = 60_000) -> dict[str, float]:
    """Fit one tenant's model on its own table; its holdout metrics and fit seconds."""
    params = load_params(ROOT / "params.yaml")
    seed = zlib.crc32((tenant or "shared").encode())
    parts = prepare.split(generate(rows, seed=seed), params.data, params.prepare)
    start = time.perf_counter()
    model = train.build(params.data, params.train).fit(
        model_frame(parts.train, params.data), target(parts.train, params.data)
    )
    fit = time.perf_counter() - start
    return {**evaluate.score(model, parts.holdout, params.data), "fit_seconds": fit}


def one_after_another(tenants: list[str], rows: int) -> tuple[float, list[float]]:
    """Wall time of N fits in this process, and each fit's seconds."""
    start = time.perf_counter()
    fits = [train_tenant.fn(tenant, rows)["fit_seconds"] for tenant in tenants]
    return time.perf_counter() - start, fits


def _prefect(env: dict[str, str], cwd: Path, *args: str) -> str:
    return run_ok([sys.executable, "-m", "prefect", *args], cwd=cwd, env=env, timeout=180)


def _worker(env: dict[str, str], home: Path, name: str) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--name", name]
    return Server(
        f"prefect worker {name}",
        [*cmd, "--limit", "1", "--with-healthcheck"],
        log_path=home / f"{name}.log",
        healthy=http_ok(f"http://127.0.0.1:{port}/health"),
        env=env | {"PREFECT_WORKER_WEBSERVER_PORT": str(port), "PREFECT_WORKER_QUERY_SECONDS": "1"},
        cwd=home,
    )


QUEUE = """
import json, sys, time
from flows import fanout
start = time.time()
ids = [str(fanout.queue("train_tenant/train_tenant", t, {"rows": int(sys.argv[2])}).id)
       for t in json.loads(sys.argv[1])]
print(json.dumps({"start": start, "ids": ids}))
"""


def through_the_pool(tenants: list[str], rows: int, home: Path, workers: int) -> float:
    """Wall time from queueing N runs to the last one's completion, on `workers` workers."""
    port = free_port()
    env = clean_env(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PYTHONPATH=str(ROOT),
    )
    ours = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    spec = {
        "name": "tenant-training",
        "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}],
        "deployments": [
            {
                "name": "train_tenant",
                "entrypoint": "benchmarks/tenant_training.py:train_tenant",
                "work_pool": {"name": POOL},
                "concurrency_limit": ours["definitions"]["per_tenant_limit"],
            }
        ],
    }
    (home / "prefect.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    server = Server(
        "prefect server",
        [*cmd, "--port", str(port)],
        log_path=home / "server.log",
        healthy=http_ok(f"http://127.0.0.1:{port}/api/health"),
        env=env,
    )
    with server, contextlib.ExitStack() as started:
        _prefect(env, ROOT, "work-pool", "create", POOL, "--type", "process")
        project = str(home / "prefect.yaml")
        _prefect(env, ROOT, "--no-prompt", "deploy", "--all", "--prefect-file", project)
        for i in range(workers):
            started.enter_context(_worker(env, home, f"w{i + 1}"))
        out = run_ok(
            [sys.executable, "-c", QUEUE, json.dumps(tenants), str(rows)],
            cwd=home,
            env=env,
            timeout=180,
        )
        queued = json.loads(out.strip().splitlines()[-1])
        return _wait(env, queued["ids"]) - float(queued["start"])


def _wait(env: dict[str, str], ids: list[str]) -> float:
    """When the last of `ids` ended (epoch seconds); every run must have completed."""
    api = env["PREFECT_API_URL"]
    while True:
        runs = httpx.post(
            f"{api}/flow_runs/filter", json={"flow_runs": {"id": {"any_": ids}}}, timeout=30
        ).json()
        if all(r["state_type"] in ("COMPLETED", "FAILED", "CRASHED") for r in runs):
            break
        time.sleep(0.5)
    assert all(r["state_type"] == "COMPLETED" for r in runs), [r["state"] for r in runs]
    return max(datetime.fromisoformat(r["end_time"]).timestamp() for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--rows", type=int, default=60_000)
    args = parser.parse_args()
    tenants = [f"tenant-{i}" for i in range(args.tenants)]
    load = os.getloadavg()[0]
    serial, fits = one_after_another(tenants, args.rows)
    pooled = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            pooled[workers] = through_the_pool(tenants, args.rows, Path(tmp), workers)
    after = os.getloadavg()[0]
    print(f"({os.cpu_count()} cores; load average {load:.1f} before, {after:.1f} after)")
    print(
        f"training {args.tenants} tenants ({args.rows:,} rows each; one fit: median "
        f"{statistics.median(fits):.1f} s), wall time"
    )
    print(f"  one after another, in process     {serial:7.1f} s")
    for workers, seconds in pooled.items():
        print(
            f"  work pool, {workers} process worker{'s' if workers > 1 else ' '}     "
            f"{seconds:7.1f} s   ({serial / seconds:.2f}x)"
        )


if __name__ == "__main__":
    main()
