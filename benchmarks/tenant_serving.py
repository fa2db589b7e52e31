"""Tenants' own models on one predictor: 20 tenants, each served a model of its own.

Registers 20 copies of the champion as `<MODEL_NAME>.bench-NN` (removed afterwards), gives
each tenant a key (revoked afterwards) and serves them all from one predictor (`bentoml
serve`, 2 workers, ONNX, prediction log on), then measures, in one run:

1. memory per loaded model: the service's RSS (every process) before any tenant's model
   and once both workers hold all 20, per model and worker
2. a cold tenant's first request: download, load and self-check on the worker it lands
   on, against a warm request
3. records/s with 32 clients sending 1-record requests, the 20 tenants' keys in turn (20
   models), against the same clients as one tenant (the shared model), measured in turns
   (A B, B A) after a warm-up; medians
4. the peer, `mlflow models serve -w 2` with OMP_NUM_THREADS=1 (perf-anchors.md): one
   model per server, so each tenant's model costs a server: its RSS, and its records/s

Needs a champion in the configured registry: run `make demo` first. Run: `make bench-tenants`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlflow
import psutil
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from benchmarks.serving import CONCURRENCY, SECONDS, _free_port, _wait, sequential, wrk_run
from common import registry
from common.localpg import prediction_db
from common.settings import Settings, get_settings
from common.store import migrate, roles, tenants
from services.predictor.demo import admin_url, sample_records
from services.predictor.launch import _stop, serving

TENANTS = tuple(f"bench-{i:02d}" for i in range(1, 21))
SHARED_TENANT = "bench-shared"
"""A tenant with no model of its own: answered by the shared champion."""
ROUNDS = 2


def _rss(pid: int) -> int:
    """Resident bytes of a process and every descendant (BentoML's workers)."""
    root = psutil.Process(pid)
    total = 0
    for proc in (root, *root.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


@contextlib.contextmanager
def tenant_models(
    client: MlflowClient, settings: Settings, champion: ModelVersion
) -> Iterator[None]:
    """Each bench tenant's own model: a copy of the champion's files, champion v1."""
    names = [registry.model_name(settings, t) for t in TENANTS]
    for name in names:
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            client.delete_registered_model(name)  # a run that was interrupted
        client.create_registered_model(name)
        client.create_model_version(
            name, str(champion.source), champion.run_id, champion.tags, model_id=champion.model_id
        )
        client.set_registered_model_alias(name, settings.model_alias, "1")
    try:
        yield
    finally:
        for name in names:
            client.delete_registered_model(name)


@contextlib.contextmanager
def tenant_keys(database_url: str) -> Iterator[dict[str, str]]:
    """A `predict` key for every bench tenant (added if missing); revoked afterwards."""
    migrate(database_url)
    known = {t.id for t in tenants.list_tenants(database_url)}
    made: dict[str, tenants.NewKey] = {}
    for tenant in (*TENANTS, SHARED_TENANT):
        if tenant not in known:
            tenants.add_tenant(database_url, tenant)
        made[tenant] = tenants.create_key(database_url, tenant, ("predict",))
    try:
        yield {t: k.secret for t, k in made.items()}
    finally:
        for key in made.values():
            tenants.revoke_key(database_url, key.tenant_id, key.key_id)


def _wrk(url: str, body: dict[str, Any], keys: list[str]) -> tuple[float, int]:
    """records/s and failed requests of 1-record requests, the keys taken in turn (wrk)."""
    wrk = shutil.which("wrk")
    assert wrk is not None
    listed = ", ".join(f'"Bearer {k}"' for k in keys)
    lua = (
        'wrk.method = "POST"\n'
        f"wrk.body = [==[{json.dumps(body)}]==]\n"
        f"local keys = {{{listed}}}\n"
        "local i = math.random(#keys)\n"
        "request = function()\n"
        "  i = i % #keys + 1\n"
        '  return wrk.format(nil, nil, {["Content-Type"] = "application/json",'
        ' ["Authorization"] = keys[i]})\n'
        "end\n"
    )
    return wrk_run(wrk, lua, url)


async def _httpx(url: str, body: dict[str, Any], keys: list[str]) -> tuple[float, int]:
    """The same without wrk: an asyncio httpx client (slower than the service)."""
    done = failed = 0
    deadline = time.perf_counter() + SECONDS
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def worker(i: int) -> None:
            nonlocal done, failed
            while time.perf_counter() < deadline:
                headers = {"authorization": f"Bearer {keys[i % len(keys)]}"}
                resp = await client.post(url, json=body, headers=headers)
                done, failed = (done + 1, failed) if resp.status_code == 200 else (done, failed + 1)
                i += CONCURRENCY

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(CONCURRENCY)))
        return done / (time.perf_counter() - start), failed


def throughput(url: str, body: dict[str, Any], keys: list[str]) -> tuple[float, int]:
    if shutil.which("wrk"):
        return _wrk(url, body, keys)
    return asyncio.run(_httpx(url, body, keys))


def _loaded(base: str) -> float:
    """Tenants' models loaded, summed over the workers (predictor_tenant_models_loaded)."""
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("predictor_tenant_models_loaded"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _load_everywhere(base: str, body: dict[str, Any], keys: dict[str, str], workers: int) -> None:
    """Requests of every tenant until each worker holds all of their models."""
    deadline = time.monotonic() + 300
    with httpx.Client(timeout=60) as client:
        while _loaded(base) < len(TENANTS) * workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {_loaded(base)} tenant models loaded")
            for tenant in TENANTS:  # new connections: the kernel spreads them over workers
                with httpx.Client(timeout=60) as fresh:
                    fresh.post(f"{base}/predict", json=body, headers=_auth(keys[tenant]))
            client.get(f"{base}/readyz")


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def ours(
    settings: Settings, one: dict[str, Any], keys: dict[str, str], port: int
) -> dict[str, Any]:
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/predict"
    body = {"records": one}
    out: dict[str, Any] = {}
    with serving(settings, port) as proc:
        shared = [keys[SHARED_TENANT]]
        own = [keys[t] for t in TENANTS]
        throughput(url, body, shared)  # warm-up: the shared model, keys checked, pools open
        time.sleep(2)
        before = _rss(proc.pid)
        cold = []
        with httpx.Client(timeout=120) as client:
            for tenant in TENANTS:
                start = time.perf_counter()
                resp = client.post(url, json=body, headers=_auth(keys[tenant]))
                cold.append(time.perf_counter() - start)
                resp.raise_for_status()
                assert resp.json()["model_name"].endswith(f".{tenant}"), resp.text
        _load_everywhere(base, body, keys, workers=2)
        time.sleep(2)
        out["rss_per_model"] = (_rss(proc.pid) - before) / (len(TENANTS) * 2)
        out["cold_ms"] = (statistics.median(cold) * 1000, max(cold) * 1000)
        out["warm_ms"] = sequential(
            lambda c: c.post(url, json=body), n=300, headers=_auth(keys[TENANTS[0]])
        )
        throughput(url, body, own)  # warm-up of the spread load
        single: list[tuple[float, int]] = []
        spread: list[tuple[float, int]] = []
        for turn in range(ROUNDS):
            for which in ("single", "spread") if turn % 2 == 0 else ("spread", "single"):
                if which == "single":
                    single.append(throughput(url, body, shared))
                else:
                    spread.append(throughput(url, body, own))
        out["single"] = (statistics.median(r for r, _ in single), sum(f for _, f in single))
        out["spread"] = (statistics.median(r for r, _ in spread), sum(f for _, f in spread))
        out["rss_total"] = _rss(proc.pid)
    return out


def peer(model_dir: Path, one: dict[str, Any]) -> dict[str, Any]:
    """`mlflow models serve -w 2` of one model: its start-up time (what a new tenant's model
    costs it), its RSS once warm, and its records/s."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/invocations"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir), "-p", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [*cmd, "--env-manager", "local", "-w", "2", "-h", "127.0.0.1"],
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        try:
            _wait(f"http://127.0.0.1:{port}/health", proc)
            start_s = time.perf_counter() - started
            body = {"dataframe_records": [one]}
            throughput(url, body, ["none"])  # warm-up
            rate = throughput(url, body, ["none"])
            return {"rss": _rss(proc.pid), "rate": rate, "start_s": start_s}
        finally:
            _stop(proc)


def _rate(measured: tuple[float, int]) -> str:
    rate, failed = measured
    return f"{rate:,.0f}" + (f" ({failed} failed)" if failed else "")


def main() -> None:
    settings = get_settings()
    client = registry.connect(settings)
    champion = registry.version_by_alias(client, settings.model_name, settings.model_alias)
    if champion is None:
        sys.exit("no champion: run `make demo` first")
    model_dir = Path(
        mlflow.artifacts.download_artifacts(f"models:/{settings.model_name}/{champion.version}")
    )
    records, _ = sample_records(100)
    one = next(r for r in records if all(v is not None for v in r.values()))
    port = _free_port()
    with (
        prediction_db(settings, role=roles.PREDICTOR) as database_url,
        tenant_models(client, settings, champion),
        tenant_keys(admin_url(settings)) as keys,
    ):
        served = settings.model_copy(update={"database_url": database_url})
        os.environ["MODEL_CACHE_SIZE"] = str(max(32, len(TENANTS)))
        got = ours(served, one, keys, port)
    them = peer(model_dir, one)

    mib = 1024 * 1024
    tool = "wrk" if shutil.which("wrk") else "python httpx"
    print(
        f"tenant serving benchmark: {len(TENANTS)} tenants' own models (copies of "
        f"{settings.model_name} v{champion.version}), {psutil.cpu_count()} cores, "
        f"{CONCURRENCY} clients ({tool}), {SECONDS:.0f} s per figure, {ROUNDS} rounds"
    )
    rows = [
        ("path", "memory per model", "first request", "rec/s c=32 x1"),
        (
            "this service, 1 tenant (shared model)",
            "-",
            "-",
            _rate(got["single"]),
        ),
        (
            f"this service, {len(TENANTS)} tenants' own models",
            f"{got['rss_per_model'] / mib:.1f} MiB a worker",
            f"{got['cold_ms'][0]:.0f} ms (max {got['cold_ms'][1]:.0f})",
            _rate(got["spread"]),
        ),
        (
            "peer: mlflow models serve -w 2 (a server a model)",
            f"{them['rss'] / mib:.0f} MiB a server",
            f"server start {them['start_s']:.1f} s",
            _rate(them["rate"]),
        ),
    ]
    for name, memory, first, rate in rows:
        print(f"{name:52} {memory:>22} {first:>22} {rate:>16}")
    print(
        f"warm request of a tenant's own model, c=1: p50 {got['warm_ms'][0]:.2f} ms, "
        f"p99 {got['warm_ms'][1]:.2f} ms; the whole service with 2x{len(TENANTS)} models "
        f"loaded: {got['rss_total'] / mib:.0f} MiB"
    )
    print(
        f"{len(TENANTS)} models vs 1: {got['spread'][0] / got['single'][0]:.0%} of the "
        "single-model records/s (aim: at least 80%)"
    )


if __name__ == "__main__":
    main()
