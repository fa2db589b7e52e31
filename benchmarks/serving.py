"""Online scoring, side by side in one run on the same model version and machine.

1. in process (the floor): models.predict.Scorer, ONNX and sklearn
2. this service over HTTP (`bentoml serve`, 2 workers, ONNX fast path, prediction log on),
   twice, side by side on one database and measured in turns: as it was before API keys
   (every request the default tenant's, no key: `benchmarks.open_predictor`), and as it
   is (a tenant's key checked, the tenant recorded on every row and answer); the
   difference is what the key check and tenant scoping cost
3. the peer: `mlflow models serve` of the same version, at its best here (2 workers,
   OMP_NUM_THREADS=1, per perf-anchors.md)
4. progressive delivery on this service (a registered model of the benchmark's own, copies
   of the champion, deleted afterwards: the user's aliases never move): canary routing (p50
   at c=1 with the challenger's weight 0 and 10) and a shadow at 50% load (p50/p99 of an
   open-loop client at half the c=32 throughput of the service, or of that client if it is
   slower, without and with a `shadow` alias), each measured in turns (A B, B A, B A, A B)

Figures: p50/p99 of single-record requests at concurrency 1 (a plain sequential client),
records/s with 32 concurrent clients sending 1-record and 100-record requests.
Needs a champion in the configured registry: run `make demo` first. Run: `make bench-serving`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import mlflow
import psutil

from common import registry
from common.localpg import prediction_db
from common.registry import CHALLENGER, variants
from common.settings import Settings, get_settings
from common.store import pool, roles, tenants
from models.predict import Scorer
from services.predictor import identity
from services.predictor.demo import admin_url, demo_key, sample_records
from services.predictor.launch import _stop, serving

SECONDS = 8.0
CONCURRENCY = 32
OPEN_SERVICE = "benchmarks.open_predictor:Predictor"
"""The predictor before API keys: no key asked, every row the default tenant's."""
KEYED_SERVICE = "services.predictor.service:Predictor"


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2], ordered[
        min(len(ordered) - 1, math.ceil(len(ordered) * 0.99) - 1)
    ]


def in_process(model_dir: Path, record: dict[str, Any]) -> dict[str, float]:
    out = {}
    for backend, onnx in (("onnx", True), ("sklearn", False)):
        scorer = Scorer.load(model_dir, prefer_onnx=onnx)
        for _ in range(200):
            scorer.predict([record])
        times = []
        for _ in range(2000 if onnx else 500):
            start = time.perf_counter()
            scorer.predict([record])
            times.append(time.perf_counter() - start)
        out[backend] = statistics.median(times) * 1000
    return out


def sequential(
    post: Callable[[httpx.Client], httpx.Response],
    n: int = 500,
    headers: dict[str, str] | None = None,
) -> tuple[float, float]:
    times = []
    with httpx.Client(timeout=30, headers=headers) as client:
        for _ in range(50):
            post(client)
        for _ in range(n):
            start = time.perf_counter()
            resp = post(client)
            times.append(time.perf_counter() - start)
            resp.raise_for_status()
    p50, p99 = _percentiles(times)
    return p50 * 1000, p99 * 1000


async def _load(
    url: str, body: dict[str, Any], records_per_request: int, headers: dict[str, str]
) -> tuple[float, int]:
    done = 0
    failed = 0
    deadline = time.perf_counter() + SECONDS
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=30, limits=limits, headers=headers) as client:

        async def worker() -> None:
            nonlocal done, failed
            while time.perf_counter() < deadline:
                resp = await client.post(url, json=body)
                if resp.status_code == 200:
                    done += records_per_request
                else:
                    failed += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return done / (time.perf_counter() - start), failed


def _wrk(
    url: str, body: dict[str, Any], records: int, headers: dict[str, str]
) -> tuple[float, int] | None:
    """records/s and failed requests measured by wrk (C, 2 threads), when it is installed."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    lua = (
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        + "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items())
        + f"wrk.body = [==[{json.dumps(body)}]==]\n"
    )
    ok, bad = wrk_run(wrk, lua, url)
    return ok * records, bad


def wrk_run(wrk: str, lua: str, url: str) -> tuple[float, int]:
    """Successful requests/s and failed requests of wrk (2 threads, CONCURRENCY, SECONDS)
    running the Lua script `lua` against `url`."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(lua)
        script.flush()
        cmd = [wrk, "-t2", f"-c{CONCURRENCY}", f"-d{SECONDS:.0f}s", "-s", script.name, url]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    done = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    if done is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    seconds = float(done.group(2)) / (1000 if done.group(3) == "ms" else 1)
    failed = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    bad = (int(failed.group(1)) if failed else 0) + (
        sum(map(int, errors.groups())) if errors else 0
    )
    return (int(done.group(1)) - bad) / seconds, bad


def throughput(
    url: str, body: dict[str, Any], records: int, headers: dict[str, str] | None = None
) -> tuple[float, int]:
    """wrk when installed (apt-get install wrk); else an asyncio httpx client, which is slower."""
    headers = headers or {}
    return _wrk(url, body, records, headers) or asyncio.run(_load(url, body, records, headers))


Figures = tuple[float, float, tuple[float, int], tuple[float, int]]
"""p50 and p99 (ms), then (records/s, failed requests) with 1-record and 100-record bodies."""


def key_check(database_url: str, key: str, n: int = 20_000) -> tuple[float, float]:
    """The guard's key check in process, as the predictor's role: the first (PostgreSQL)
    and then a cached one, with the revocation listener up; (ms, µs)."""
    lookups = pool(database_url)
    lookups.open(wait=True)
    keys = identity.Keys(database_url, lookups)
    keys.start()
    headers = {"authorization": f"Bearer {key}"}
    needed = frozenset({"predict"})
    try:
        deadline = time.monotonic() + 10
        while not keys.listening and time.monotonic() < deadline:
            time.sleep(0.05)
        start = time.perf_counter()
        asyncio.run(identity.authorize(keys, headers, needed))
        first = time.perf_counter() - start

        async def cached() -> float:
            start = time.perf_counter()
            for _ in range(n):
                identity.forget(identity.as_caller(await identity.authorize(keys, headers, needed)))
            return (time.perf_counter() - start) / n

        return first * 1000, asyncio.run(cached()) * 1e6
    finally:
        keys.close()
        lookups.close()


def both_flavours(
    settings: Settings, one: dict[str, Any], batch: list[dict[str, Any]], rounds: int = 4
) -> tuple[Figures, Figures, tuple[float, float]]:
    """This service without keys and with one, served side by side on one database and
    measured in turns (A B, B A, B A, A B), so that a busy moment or a drift over the run
    hits both alike; medians.
    Also the key check alone, in process (`key_check`)."""
    with prediction_db(settings, role=roles.PREDICTOR) as database_url:
        shared = settings.model_copy(update={"database_url": database_url})
        ports = _free_port(), _free_port()
        urls = [f"http://127.0.0.1:{port}/predict" for port in ports]
        key = demo_key(admin_url(settings))
        headers = [{}, {"Authorization": f"Bearer {key.secret}"}]
        check = key_check(database_url, key.secret)
        try:
            with (
                serving(shared, ports[0], service=OPEN_SERVICE),
                serving(shared, ports[1], service=KEYED_SERVICE),
            ):
                for i in (0, 1):  # warm-up, not counted: the first load runs faster
                    throughput(urls[i], {"records": one}, 1, headers[i])
                    throughput(urls[i], {"records": batch}, 100, headers[i])
                latency: list[list[tuple[float, float]]] = [[], []]
                single: list[list[tuple[float, int]]] = [[], []]
                batched: list[list[tuple[float, int]]] = [[], []]
                for turn in range(rounds):
                    # A B, B A, B A, A B: a steady drift over the run favours neither side
                    order = (0, 1) if turn % 4 in (0, 3) else (1, 0)
                    for i in order:
                        post = functools.partial(_post_one, urls[i], one)
                        latency[i].append(sequential(post, headers=headers[i]))
                        single[i].append(throughput(urls[i], {"records": one}, 1, headers[i]))
                        body = {"records": batch}
                        batched[i].append(throughput(urls[i], body, 100, headers[i]))
        finally:
            tenants.revoke_key(admin_url(settings), key.tenant_id, key.key_id)
    anonymous, keyed = (
        (
            statistics.median(p50 for p50, _ in latency[i]),
            statistics.median(p99 for _, p99 in latency[i]),
            _median(single[i]),
            _median(batched[i]),
        )
        for i in (0, 1)
    )
    return anonymous, keyed, check


VARIANT_POLL_SECONDS = 1.0
"""The variants service's alias poll: a weight or alias change is served within it."""


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for the servers started inside the block (then restore)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def variant_copies(settings: Settings, copies: int = 3) -> Iterator[tuple[str, Any]]:
    """A registered model of the benchmark's own: v1..v`copies`, each the champion's
    version, champion -> v1; deleted afterwards. Yields its name and the client."""
    client = registry.connect(settings)
    source = registry.version_by_alias(client, settings.model_name, settings.model_alias)
    if source is None or source.source is None:
        sys.exit("no champion: run `make demo` first")
    name = f"bench-variants-{os.getpid()}"
    client.create_registered_model(name)
    try:
        model_id = (
            source.source.removeprefix("models:/") if source.source.startswith("models:/") else None
        )
        for _ in range(copies):
            client.create_model_version(
                name, source.source, source.run_id, source.tags, model_id=model_id
            )
        client.set_registered_model_alias(name, registry.CHAMPION, "1")
        yield name, client
    finally:
        client.delete_registered_model(name)


def _settle(url: str, headers: dict[str, str], seen: Callable[[dict[str, Any]], bool]) -> None:
    """Until 12 /model answers in a row (either worker) show `seen` variants, then a poll."""
    deadline = time.monotonic() + 60
    streak = 0
    while streak < 12:
        if time.monotonic() > deadline:
            raise RuntimeError("the predictor never served the variants asked for")
        info = httpx.get(f"{url}/model/", headers=headers, timeout=30).json()
        streak = streak + 1 if seen(info["variants"]) else 0
        time.sleep(0.05)
    time.sleep(VARIANT_POLL_SECONDS)


def paced(
    url: str, body: dict[str, Any], rate: float, headers: dict[str, str]
) -> tuple[float, float, float, int]:
    """An open-loop client at `rate` requests/s for SECONDS: p50 and p99 (ms, from each
    request's scheduled start, so a stall counts for every request it holds up), the rate
    reached, failed requests."""

    async def run() -> tuple[list[float], int, float]:
        times: list[float] = []
        failed = 0
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=30, limits=limits, headers=headers) as client:
            for _ in range(20):
                await client.post(url, json=body)
            start = time.perf_counter() + 0.1

            async def one(at: float) -> None:
                nonlocal failed
                await asyncio.sleep(max(0.0, at - time.perf_counter()))
                resp = await client.post(url, json=body)
                if resp.status_code != 200:
                    failed += 1
                times.append(time.perf_counter() - at)

            n = int(rate * SECONDS)
            await asyncio.gather(*(one(start + i / rate) for i in range(n)))
            return times, failed, n / (time.perf_counter() - start)

    times, failed, reached = asyncio.run(run())
    p50, p99 = _percentiles(times)
    return p50 * 1000, p99 * 1000, reached, failed


def _shadow_dropped(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    found = re.search(r"^predictor_shadow_dropped_total(?:\{[^}]*\})? ([\d.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


VariantFigures = dict[str, Any]
"""canary: p50 (ms) at weight 0 and 10; shadow: p50/p99 (ms) off and on, the load, drops."""


def progressive(settings: Settings, one: dict[str, Any], rounds: int = 4) -> VariantFigures:
    """Canary routing and a shadow at 50% load on this service, measured in turns."""
    at = datetime.now(UTC).isoformat(timespec="seconds")
    with (
        prediction_db(settings, role=roles.PREDICTOR) as database_url,
        variant_copies(settings) as (name, client),
    ):
        served = settings.model_copy(
            update={
                "database_url": database_url,
                "model_base": name,
                "mlops_env": "dev",
                "model_poll_seconds": VARIANT_POLL_SECONDS,
            }
        )
        key = demo_key(admin_url(settings))
        headers = {"Authorization": f"Bearer {key.secret}"}
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        url = f"{base}/predict"
        body = {"records": one}
        env = {"MODEL_NAME": name, "MLOPS_ENV": "dev", "MODEL_POLL_SECONDS": "1"}
        try:
            with _environ(**env), serving(served, port):

                def weigh(weight: float) -> None:
                    variants.set_weight(
                        client, name, weight, by="benchmark", reason="benchmark", at=at
                    )
                    _settle(base, headers, lambda v: v["challenger_weight"] == weight)

                def shadow(on: bool) -> None:
                    if on:
                        client.set_registered_model_alias(name, variants.SHADOW, "3")
                    else:
                        client.delete_registered_model_alias(name, variants.SHADOW)
                    _settle(base, headers, lambda v: (v["shadow"] is not None) == on)

                throughput(url, body, 1, headers)  # warm-up
                full, _ = throughput(url, body, 1, headers)
                # half of what the service takes and the paced client below can send
                rate = min(full, asyncio.run(_load(url, body, 1, headers))[0]) / 2
                # canary routing: the challenger (v2, the same files) at weight 0 and 10
                client.set_registered_model_alias(name, CHALLENGER, "2")
                canary: dict[float, list[float]] = {0: [], 10: []}
                for turn in range(rounds):
                    for weight in (0, 10) if turn % 4 in (0, 3) else (10, 0):
                        weigh(weight)
                        post = functools.partial(_post_one, url, one)
                        canary[weight].append(sequential(post, n=1000, headers=headers)[0])
                weigh(0)
                client.delete_registered_model_alias(name, CHALLENGER)
                # a shadow at half the c=32 throughput
                load: dict[bool, list[tuple[float, float, float, int]]] = {False: [], True: []}
                dropped = 0.0
                for turn in range(rounds):
                    for on in (False, True) if turn % 4 in (0, 3) else (True, False):
                        shadow(on)
                        before = _shadow_dropped(base)
                        load[on].append(paced(url, body, rate, headers))
                        dropped += _shadow_dropped(base) - before
        finally:
            tenants.revoke_key(admin_url(settings), key.tenant_id, key.key_id)
    return {
        "canary": {w: statistics.median(v) for w, v in canary.items()},
        "shadow": {
            on: (
                statistics.median(run[0] for run in runs),
                statistics.median(run[1] for run in runs),
                statistics.median(run[2] for run in runs),
                sum(run[3] for run in runs),
            )
            for on, runs in load.items()
        },
        "rate": rate,
        "dropped": dropped,
    }


def _post_one(url: str, record: dict[str, Any], client: httpx.Client) -> httpx.Response:
    return client.post(url, json={"records": record})


def _median(runs: list[tuple[float, int]]) -> tuple[float, int]:
    return statistics.median(r for r, _ in runs), sum(f for _, f in runs)


def _row(
    name: str, p50: float, p99: float, single: tuple[float, int], batched: tuple[float, int]
) -> tuple[str, str, str, str]:
    return (
        name,
        f"{p50:.2f} / {p99:.2f} ms",
        f"{single[0]:,.0f}" + (f" ({single[1]} failed)" if single[1] else ""),
        f"{batched[0]:,.0f}" + (f" ({batched[1]} failed)" if batched[1] else ""),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready")


def show_progressive(staged: VariantFigures) -> None:
    """The canary and shadow figures beside each other, with their aims."""
    print()
    print("progressive delivery on this service (a tenant's key, 2 workers):")
    c0, c10 = staged["canary"][0], staged["canary"][10]
    print(f"{'canary routing, c=1 p50':50} {'weight 0':>18} {'weight 10':>16} {'difference':>16}")
    print(f"{'':50} {c0:>15.3f} ms {c10:>13.3f} ms {c10 - c0:>+13.3f} ms")
    off, on = staged["shadow"][False], staged["shadow"][True]
    head = f"shadow at 50% load ({staged['rate']:,.0f} req/s asked)"
    print(f"{head:50} {'p50 / p99':>18} {'req/s reached':>16} {'failed':>16}")
    for label, (p50, p99, reached, failed) in (("  no shadow", off), ("  shadow alias set", on)):
        print(f"{label:50} {f'{p50:.2f} / {p99:.2f} ms':>18} {reached:>16,.0f} {failed:>16}")
    rise = on[1] - off[1]
    if min(off[2], on[2]) < staged["rate"] * 0.9:
        print("  (the paced client fell behind the rate asked: the p99s include its queue)")
    print(
        f"canary routing: {c10 - c0:+.3f} ms at p50 (aim: at most +0.1); shadow: primary p99 "
        f"{rise:+.2f} ms ({on[1] / off[1] - 1:+.1%}; aim: at most +5% or +2 ms), "
        f"{staged['dropped']:.0f} shadow copies dropped"
    )


def main() -> None:
    settings = get_settings()
    client = registry.connect(settings)
    mv = registry.version_by_alias(client, settings.model_name, settings.model_alias)
    if mv is None:
        sys.exit("no champion: run `make demo` first")
    model_dir = Path(
        mlflow.artifacts.download_artifacts(f"models:/{settings.model_name}/{mv.version}")
    )
    records, _ = sample_records(100)
    complete = [r for r in records if all(v is not None for v in r.values())]
    one = complete[0]
    batch = (complete * 100)[:100]
    rows: list[tuple[str, str, str, str]] = []

    floor = in_process(model_dir, one)
    rows.append(("in-process onnxruntime (floor)", f"{floor['onnx']:.3f} ms", "-", "-"))
    rows.append(("in-process sklearn", f"{floor['sklearn']:.3f} ms", "-", "-"))

    anonymous, keyed, check = both_flavours(settings, one, batch)
    staged = progressive(settings, one)
    rows.append(_row("this service, no key (as before API keys)", *anonymous))
    rows.append(_row("this service, a tenant's key (bentoml, 2 workers)", *keyed))
    ours = (keyed[0], keyed[2][0])

    port = _free_port()
    peer_url = f"http://127.0.0.1:{port}/invocations"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir), "-p", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryFile() as log:
        peer = subprocess.Popen(
            [*cmd, "--env-manager", "local", "-w", "2", "-h", "127.0.0.1"],
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        try:
            _wait(f"http://127.0.0.1:{port}/health", peer)
            p50m, p99m = sequential(lambda c: c.post(peer_url, json={"dataframe_records": [one]}))
            single_m, g1 = throughput(peer_url, {"dataframe_records": [one]}, 1)
            batched_m, g2 = throughput(peer_url, {"dataframe_records": batch}, 100)
        finally:
            _stop(peer)
    rows.append(
        (
            "peer: mlflow models serve -w 2, OMP_NUM_THREADS=1",
            f"{p50m:.2f} / {p99m:.2f} ms",
            f"{single_m:,.0f}" + (f" ({g1} failed)" if g1 else ""),
            f"{batched_m:,.0f}" + (f" ({g2} failed)" if g2 else ""),
        )
    )

    print(
        f"serving benchmark: {settings.model_name} v{mv.version}, {psutil.cpu_count()} cores, "
        f"{CONCURRENCY} clients ({'wrk' if shutil.which('wrk') else 'python httpx'}) "
        f"for {SECONDS:.0f} s per figure"
    )
    print(f"{'path':50} {'c=1 p50 / p99':>18} {'rec/s c=32 x1':>16} {'rec/s c=32 x100':>16}")
    for name, lat, s1, s100 in rows:
        print(f"{name:50} {lat:>18} {s1:>16} {s100:>16}")
    print(
        f"key check + tenant scoping: {keyed[0] - anonymous[0]:+.2f} ms at p50 (aim: at most "
        f"+0.30), {keyed[2][0] / anonymous[2][0] - 1:+.1%} records/s at c={CONCURRENCY} x1, "
        f"{keyed[3][0] / anonymous[3][0] - 1:+.1%} x100 (aim: no worse than -10%)"
    )
    print(
        f"the key check alone, in process: {check[1]:.1f} µs for a cached key, "
        f"{check[0]:.2f} ms for the first check (PostgreSQL)"
    )
    print(f"p50 above the in-process floor: {ours[0] - floor['onnx']:.2f} ms (aim: within 3 ms)")
    print(f"1-record throughput vs the peer: {ours[1] / single_m:.1f}x (aim: at least 2x)")
    show_progressive(staged)


if __name__ == "__main__":
    main()
