"""The monitoring profile's alert rules, checked offline with Prometheus's own promtool:
the config loads them, they parse, and each fires on synthetic series when it should."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.workspace import ROOT

DOCKER = ROOT / "infra" / "docker"
UNIT_TESTS = Path(__file__).parent / "prometheus" / "alerts_test.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    """Debian's `prometheus` package brings it (.ci/run installs it when missing)."""
    found = shutil.which("promtool")
    assert found, "promtool not found: apt-get install -y prometheus"
    return found


def _run(promtool: str, *args: str) -> str:
    done = subprocess.run([promtool, *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_the_prometheus_config_loads_the_alert_rules(promtool: str) -> None:
    out = _run(promtool, "check", "config", str(DOCKER / "prometheus.yml"))

    assert "prometheus-alerts.yml" in out
    assert "SUCCESS: 10 rules found" in out


def test_each_alert_fires_on_synthetic_series_when_it_should(promtool: str) -> None:
    assert "SUCCESS" in _run(promtool, "test", "rules", str(UNIT_TESTS))


def test_compose_mounts_the_rules_where_the_config_names_them() -> None:
    volumes = yaml.safe_load((DOCKER / "compose.yml").read_text())["services"]["prometheus"][
        "volumes"
    ]

    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in volumes
    assert "./prometheus-alerts.yml:/etc/prometheus/prometheus-alerts.yml:ro" in volumes


def test_compose_gives_the_monitor_exporter_its_queries_and_prometheus_scrapes_it() -> None:
    services = yaml.safe_load((DOCKER / "compose.yml").read_text())["services"]
    exporter = services["monitor-exporter"]
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())

    queries = "./prometheus-monitor-queries.yml:/etc/postgres_exporter/queries.yml:ro"
    assert queries in exporter["volumes"]
    assert "--extend.query-path=/etc/postgres_exporter/queries.yml" in exporter["command"]
    assert exporter["profiles"] == ["monitoring"]
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in config["scrape_configs"]}
    assert targets["monitor"] == ["monitor-exporter:9187"]
