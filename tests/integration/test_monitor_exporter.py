"""The monitor's verdicts as Prometheus metrics: Debian's postgres_exporter (the binary the
compose image packages) with infra/docker/prometheus-monitor-queries.yml, logged in as
mlops_grafana, over a migrated prediction database with real monitoring_runs rows."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.localpg import LocalPostgres
from common.store import connect, migrate, roles
from tests.servers import Server, clean_env, free_port, http_ok
from tests.workspace import ROOT

QUERIES = ROOT / "infra" / "docker" / "prometheus-monitor-queries.yml"
T0 = datetime(2026, 11, 1, tzinfo=UTC)


def _record(admin: str, model: str, variant: str, at: datetime, drift: bool) -> None:
    with connect(admin) as conn:
        conn.execute(
            "INSERT INTO monitoring_runs (run_id, ts, model_name, model_version, window_start,"
            " window_end, current_rows, labelled_rows, enough_rows, drift_detected, summary,"
            " variant) VALUES (%s, %s, %s, '1', %s, %s, 2000, 0, true, %s, '', %s)",
            (str(uuid.uuid4()), at, model, at - timedelta(hours=24), at, drift, variant),
        )


@pytest.fixture
def exporter(postgres: LocalPostgres, tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("prometheus-postgres-exporter")
    assert binary, "apt-get install -y prometheus-postgres-exporter (.ci/run does)"
    postgres.start()
    name = f"exporter_{uuid.uuid4().hex[:12]}"
    postgres.create_database(name)
    admin = postgres.url(name)
    migrate(admin)
    roles.enable_login(admin, roles.GRAFANA)
    _record(admin, "churn-classifier", "champion", T0, drift=True)
    _record(admin, "churn-classifier", "champion", T0 + timedelta(hours=1), drift=False)
    _record(admin, "churn-classifier.acme", "champion", T0, drift=False)
    _record(admin, "churn-classifier.acme", "champion", T0 + timedelta(hours=2), drift=True)
    _record(admin, "churn-classifier.acme", "challenger", T0 + timedelta(hours=2), drift=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    dsn = roles.role_url(admin, roles.GRAFANA) + "?sslmode=disable"
    cmd = [
        binary,
        f"--web.listen-address=127.0.0.1:{port}",
        "--disable-default-metrics",
        "--disable-settings-metrics",
        "--no-collector.database",
        "--no-collector.bgwriter",
        f"--extend.query-path={QUERIES}",
    ]
    server = Server(
        "postgres_exporter",
        cmd,
        log_path=tmp_path / "exporter.log",
        healthy=http_ok(url),
        env=clean_env(DATA_SOURCE_NAME=dsn),
    )
    with server.start(timeout=30):
        yield url


def test_the_latest_verdict_of_each_model_and_variant_is_a_metric(exporter: str) -> None:
    text = httpx.get(exporter, timeout=10).text
    samples = {
        (s.name, s.labels["model_name"], s.labels["variant"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("mlops_monitor_")
    }

    assert samples[("mlops_monitor_drift_detected", "churn-classifier", "champion")] == 0
    assert samples[("mlops_monitor_drift_detected", "churn-classifier.acme", "champion")] == 1
    assert samples[("mlops_monitor_drift_detected", "churn-classifier.acme", "challenger")] == 0
    last = samples[("mlops_monitor_last_run_timestamp_seconds", "churn-classifier", "champion")]
    assert last == (T0 + timedelta(hours=1)).timestamp()
    assert samples[("mlops_monitor_enough_rows", "churn-classifier", "champion")] == 1
