"""Drill: the predictor's write-ahead directory on a full disk (a 1 MiB tmpfs).

While no row can be written ahead, /predict answers 503 with Retry-After (nothing was
acknowledged), /readyz fails and the refused counter rises; once space is freed the
service answers again, and every prediction it answered 200 is in PostgreSQL.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from common.localpg import LocalPostgres
from tests.integration.serving import (
    api_key,
    auth,
    predictor_database,
    register_copies,
    serve_predictor,
)
from tests.servers import HttpServer, throwaway_cluster
from tests.workspace import Workspace

SERVED = "churn-full-disk"
RECORD: dict[str, Any] = {
    "tenure_months": 12,
    "monthly_charges": 70.5,
    "total_charges": 846.0,
    "support_tickets_90d": 2,
    "avg_daily_usage_min": 60.0,
    "days_since_last_login": 3,
    "num_products": 2,
    "age": 41,
    "late_payments_12m": 0,
    "satisfaction_score": None,
    "contract_type": "month_to_month",
    "payment_method": "electronic_check",
    "region": "north",
    "plan_tier": "standard",
}


@pytest.fixture(scope="module")
def logdb() -> Iterator[LocalPostgres]:
    with throwaway_cluster("fulldisk", "predictions") as pg:
        yield pg


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(the predictor's home, its spill dir on a 1 MiB tmpfs), unmounted afterwards."""
    home = tmp_path_factory.mktemp("full-disk")
    spill = home / ".mlops" / "spill"
    spill.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(spill)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield home, spill
    finally:
        subprocess.run(["umount", "-l", str(spill)], check=False)


@pytest.fixture(scope="module")
def predictor(
    mlflow_server: HttpServer,
    pipeline: Workspace,
    logdb: LocalPostgres,
    small_disk: tuple[Path, Path],
) -> Iterator[str]:
    register_copies(mlflow_server.url, SERVED, versions=1)
    _, as_predictor = predictor_database(logdb)
    env = {
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "MODEL_NAME": SERVED,
        "MODEL_POLL_SECONDS": "1",
        "DATABASE_URL": as_predictor,
    }
    with serve_predictor(small_disk[0], env) as url:
        yield url


def fill(directory: Path) -> Path:
    """Write a file into `directory` until its disk is full; the file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                os.write(fd, b"\0" * 4096)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return filler
    finally:
        os.close(fd)


def counter(url: str, name: str) -> float:
    lines = httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name))


def test_a_full_disk_refuses_with_503_and_loses_no_answered_prediction(
    predictor: str, logdb: LocalPostgres, small_disk: tuple[Path, Path]
) -> None:
    headers = auth(api_key(logdb.url("predictions")))
    answered: list[str] = []
    statuses: list[int] = []
    retry_after: list[str | None] = []

    def send(n: int) -> None:
        with httpx.Client(timeout=30, headers=headers) as client:
            for _ in range(n):
                resp = client.post(f"{predictor}/predict", json={"records": [RECORD, RECORD]})
                statuses.append(resp.status_code)
                if resp.status_code == 200:
                    answered.extend(a["request_id"] for a in resp.json()["predictions"])
                else:
                    assert resp.status_code == 503, resp.text
                    assert "nothing was recorded" in resp.json()["error"]
                    retry_after.append(resp.headers.get("retry-after"))

    send(10)
    assert statuses == [200] * 10
    assert counter(predictor, "predictor_log_written_rows_total") >= 20
    text = httpx.get(f"{predictor}/metrics", timeout=10).text
    assert "predictor_log_backlog_bytes" in text
    assert "predictor_log_fsync_lag_seconds" in text
    refused_before = counter(predictor, "predictor_log_refused_rows_total")
    filler = fill(small_disk[1])
    try:
        send(40)  # a segment's last page may take a few more lines before a write fails
        assert 503 in statuses[10:]
        assert retry_after
        assert all(value and int(value) >= 1 for value in retry_after)
        assert httpx.get(f"{predictor}/readyz", timeout=10).status_code == 503
        assert counter(predictor, "predictor_log_refused_rows_total") > refused_before
        assert counter(predictor, "predictor_log_write_failures_total") > 0
    finally:
        os.unlink(filler)

    deadline = time.monotonic() + 30
    while httpx.get(f"{predictor}/readyz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "/readyz never recovered"
        time.sleep(0.5)
    statuses.clear()
    send(10)
    assert statuses == [200] * 10

    with psycopg.connect(logdb.url("predictions")) as conn:
        deadline = time.monotonic() + 60
        while True:
            (found,) = conn.execute(
                "SELECT count(*) FROM predictions WHERE request_id = ANY(%s::uuid[])", (answered,)
            ).fetchone() or (0,)
            if found == len(answered) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert found == len(answered)
