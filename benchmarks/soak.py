"""Soak: mixed traffic at half the measured capacity for N minutes, a monitor run and a
retrain in the middle; what must stay flat, per minute.

Set-up (not timed): a throwaway stack of local processes as the integration tests start
them: one PostgreSQL cluster (MLflow's database and the prediction log), moto as the S3
endpoint, `mlflow server` (one worker, artifacts proxied to S3), the pipeline once in a
project copy (`dvc repro` on the small FAST data), then `bentoml serve` (2 workers) on its
champion, logging in as `mlops_predictor` with a default tenant's key on every request.

1. capacity: 1-record /predict, 32 concurrent clients for 8 s (benchmarks.serving's load);
2. soak: `tests.steady.SteadyClient` at half that rate, /feedback for 30% of the answers
   and a 5-record POST /jobs a second, for `--minutes`; halfway through, the monitor flow
   (`python -m flows.monitor`) and then the retrain flow run in the project copy, as a
   worker would run them (the retrain's gate may promote, and the predictor swap live);
3. per minute: requests, server errors (5xx or no answer), p50/p99 of /predict, RSS of the
   predictor's serve process and each worker, PostgreSQL (all its processes) and MLflow
   (its process group);
4. at the end: acknowledged predictions, labels and jobs against the rows logged.

No peer: what is measured is this stack's own promise (no server error, nothing
acknowledged lost, memory flat), not a speed to compare.
Run: `make bench-soak` (`--minutes 2` for a quick look); needs no `make demo`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from benchmarks.serving import CONCURRENCY, SECONDS, throughput
from common.localpg import LocalPostgres
from tests.integration.serving import api_key, predictor_database, serve_predictor
from tests.integration.test_predictor import RECORD
from tests.servers import (
    FAKE_AWS_CREDS,
    MLFLOW_BUCKET,
    VENV_BIN,
    S3Endpoint,
    Server,
    clean_env,
    free_port,
    http_ok,
    throwaway_cluster,
)
from tests.steady import Outcome, Rates, SteadyClient, check, serve_family
from tests.workspace import Workspace, make_workspace

RECORDS = [
    {**RECORD, "satisfaction_score": 6.0},
    {**RECORD, "contract_type": "two_year", "tenure_months": 60, "satisfaction_score": 8.0},
]
"""With a satisfaction score: a window where a monitored column is all missing fails the
monitor run, and labelled rows mostly without it fail the retrain's data contract (both
seen in the first 2-minute run)."""
MIB = 1024 * 1024


@dataclass
class Stack:
    """Where the stack answers, and what to measure of it."""

    pg: LocalPostgres
    mlflow_url: str
    mlflow_pid: int
    workspace: Workspace
    admin_url: str
    predictor_url: str
    key: str


@contextmanager
def stack(base: Path) -> Iterator[Stack]:
    """The throwaway stack of the module docstring; every process stopped afterwards."""
    with ExitStack() as stop:
        pg = stop.enter_context(throwaway_cluster("soak", "mlflow"))
        pg.create_database("predictions")
        s3_port = free_port()
        s3 = S3Endpoint(f"http://127.0.0.1:{s3_port}", dict(FAKE_AWS_CREDS))
        moto = Server(
            "moto_server",
            [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
            log_path=base / "moto.log",
            healthy=http_ok(f"{s3.url}/moto-api/"),
            env=clean_env(),
        )
        stop.enter_context(moto.start(timeout=30))
        s3.client().create_bucket(Bucket=MLFLOW_BUCKET)
        port = free_port()
        mlflow_url = f"http://127.0.0.1:{port}"
        mlflow = Server(
            "mlflow server",
            [
                str(VENV_BIN / "mlflow"),
                "server",
                *("--backend-store-uri", pg.url("mlflow", driver="psycopg")),
                *("--artifacts-destination", f"s3://{MLFLOW_BUCKET}/", "--serve-artifacts"),
                *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
            ],
            log_path=base / "mlflow.log",
            healthy=http_ok(f"{mlflow_url}/health"),
            env=clean_env(
                MLFLOW_S3_ENDPOINT_URL=s3.url,
                MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
                **s3.creds,
            ),
        )
        stop.enter_context(mlflow.start(timeout=300))  # slow on a busy machine
        assert mlflow.pid is not None
        admin, as_predictor = predictor_database(pg)
        prefect_home = tempfile.mkdtemp(prefix="soak-prefect-")
        ws = make_workspace(
            base / "project",
            env={
                "MLFLOW_TRACKING_URI": mlflow_url,
                "DATABASE_URL": admin,
                "PREFECT_HOME": prefect_home,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
            },
        )
        started = time.monotonic()
        ws.run("dvc", "repro", timeout=1200)
        print(f"set-up: the pipeline ran in {time.monotonic() - started:.0f} s", flush=True)
        env = {
            "MLFLOW_TRACKING_URI": mlflow_url,
            "MODEL_POLL_SECONDS": "5",
            "DATABASE_URL": as_predictor,
        }
        url = stop.enter_context(serve_predictor(base / "predictor", env))
        yield Stack(pg, mlflow_url, mlflow.pid, ws, admin, url, api_key(admin))


@dataclass
class Flows:
    """The monitor run and the retrain in the middle: (name, start, end, exit code)."""

    runs: list[tuple[str, float, float, int]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)


def run_flows(ws: Workspace, client: SteadyClient, at: float, out: Flows) -> None:
    """At `at` seconds of traffic: the monitor flow, then the retrain flow (one process each)."""
    client.pause(max(0.0, at - client.now()))
    for name, args in (
        ("monitor", ("-m", "flows.monitor")),
        ("retrain", ("-c", "from flows.retrain import retrain; print(retrain())")),
    ):
        start = client.now()
        proc = ws.python(*args, check=False)
        out.runs.append((name, start, client.now(), proc.returncode))
        if proc.returncode:
            print(f"{name} exited {proc.returncode}:\n{proc.stderr[-2000:]}", file=sys.stderr)
    out.done.set()


def _rss(procs: list[psutil.Process]) -> float:
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / MIB


def _group(pgid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                found.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return found


def memory(s: Stack) -> dict[str, float]:
    """RSS in MiB: the serve process, each worker, PostgreSQL (every process), MLflow (group)."""
    serve, workers = serve_family(s.predictor_url)
    pg_pid = s.pg.pid
    postgres = [psutil.Process(pg_pid), *psutil.Process(pg_pid).children()] if pg_pid else []
    sizes = {"serve": _rss([serve])}
    for n, worker in enumerate(sorted(workers, key=lambda w: w.pid), 1):
        sizes[f"worker {n}"] = _rss([worker])
    sizes["postgres"] = _rss(postgres)
    sizes["mlflow"] = _rss(_group(s.mlflow_pid))
    return sizes


def _ms(values: list[float], q: float) -> float:
    if len(values) < 2:  # quantiles needs two
        return values[0] * 1000 if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] * 1000


def per_minute(outcomes: list[Outcome], samples: dict[int, dict[str, float]]) -> None:
    """The table: one row a minute."""
    names = list(next(iter(samples.values()), {}))
    print(
        f"{'min':>3} {'requests':>9} {'5xx/none':>9} {'4xx':>5} {'p50 ms':>7} {'p99 ms':>7}  "
        + " ".join(f"{n:>9}" for n in names)
        + "   (RSS MiB)"
    )
    minutes = sorted({int(o.at // 60) for o in outcomes})
    for minute in minutes:
        these = [o for o in outcomes if int(o.at // 60) == minute]
        server = sum(o.server_error for o in these)
        client = sum(not o.ok and not o.server_error for o in these)
        times = [o.seconds for o in these if o.kind == "predict" and o.ok]
        rss = samples.get(minute, {})
        print(
            f"{minute + 1:>3} {len(these):>9,} {server:>9} {client:>5} "
            f"{_ms(times, 50):>7.1f} {_ms(times, 99):>7.1f}  "
            + " ".join(f"{rss.get(n, float('nan')):>9.0f}" for n in names)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="soak length (default 10)")
    parser.add_argument(
        "--share", type=float, default=0.5, help="share of the measured capacity (default 0.5)"
    )
    args = parser.parse_args()
    if args.minutes <= 0 or not 0 < args.share <= 1:
        parser.error("--minutes must be > 0 and --share in (0, 1]")
    base = Path(tempfile.mkdtemp(prefix="soak-"))
    with stack(base) as s:
        headers = {"authorization": f"Bearer {s.key}"}
        capacity, failed = throughput(f"{s.predictor_url}/predict", {"records": RECORD}, 1, headers)
        rate = capacity * args.share
        print(
            f"capacity: {capacity:,.0f} predictions/s (1 record, c={CONCURRENCY}, "
            f"{SECONDS:.0f} s, {failed} failed); soak at {rate:,.0f}/s for {args.minutes:g} min, "
            f"{psutil.cpu_count()} cores",
            flush=True,
        )
        rates = Rates(predict=rate, feedback_share=0.3, jobs=1.0, records_per_job=5, threads=16)
        seconds = args.minutes * 60
        samples: dict[int, dict[str, float]] = {}
        flows = Flows()
        with SteadyClient(s.predictor_url, s.key, RECORDS, rates) as client:
            middle = threading.Thread(
                target=run_flows, args=(s.workspace, client, seconds / 2, flows), daemon=True
            )
            middle.start()
            minute = 0
            while client.now() < seconds or not flows.done.is_set():
                client.pause(max(0.0, (minute + 1) * 60 - 1 - client.now()))
                samples[minute] = memory(s)
                minute += 1
                print(f"minute {minute}: sampled", flush=True)
            client.pause(1)
        middle.join()
        result = check(client, s.admin_url, settle=0)
        outcomes = client.outcomes
        print(
            f"soak: {len(outcomes):,} requests in {client.now() / 60:.1f} min "
            f"({sum(o.kind == 'predict' for o in outcomes) / client.now():,.0f} /predict a "
            f"second against {rate:,.0f} asked)"
        )
        per_minute(outcomes, samples)
        for name, start, end, code in flows.runs:
            print(f"{name}: {start:.0f}-{end:.0f} s, exit {code}")
        errors = sum(o.server_error for o in outcomes)
        print(f"server errors: {errors}")
        print(f"acknowledged vs logged: {result.summary()}")


if __name__ == "__main__":
    main()
