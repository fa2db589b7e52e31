"""Each environment's own database, state, work pool and stack; dev's stay as they were."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from prefect.utilities.templating import apply_values

from common.localpg import embedded_database
from common.settings import ENVIRONMENTS, Settings
from scripts.stack import BUCKETS, Ports, Stack, stack_home
from services.predictor.demo import admin_url
from tests.workspace import ROOT

pytestmark = pytest.mark.unit


def _settings(**env: str) -> Settings:
    return Settings(**env)  # type: ignore[arg-type]


def test_each_environment_has_its_own_database_pool_and_state_dir(tmp_path: Path) -> None:
    home = str(tmp_path)
    seen = {
        env: (
            embedded_database(env),
            (s := _settings(MLOPS_HOME=home, MLOPS_ENV=env)).work_pool,
            s.env_home,
            s.evidently_target,
            s.model_name,
        )
        for env in ENVIRONMENTS
    }

    assert seen["dev"] == (
        "predictions",
        "local-process",
        tmp_path,
        str((tmp_path / "evidently").resolve()),
        "churn-classifier",
    )
    assert seen["prod"][:3] == ("predictions_prod", "local-process-prod", tmp_path / "prod")
    for position in range(5):
        assert len({values[position] for values in seen.values()}) == 3, position


def test_the_serve_demo_keys_its_own_environments_embedded_database(tmp_path: Path) -> None:
    urls = {
        env: admin_url(_settings(MLOPS_HOME=str(tmp_path), MLOPS_ENV=env)) for env in ENVIRONMENTS
    }
    assert {env: url.rsplit("/", 1)[1] for env, url in urls.items()} == {
        "dev": "predictions",
        "staging": "predictions_staging",
        "prod": "predictions_prod",
    }


def test_a_work_pool_set_explicitly_wins() -> None:
    s = _settings(MLOPS_ENV="staging", PREFECT_WORK_POOL="k8s-staging")
    assert s.work_pool == "k8s-staging"


def test_every_deployment_targets_the_pool_prefect_deploy_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`prefect deploy` fills `{{ $VAR }}` from its environment, as this does."""
    monkeypatch.setenv("PREFECT_WORK_POOL", "local-process-staging")
    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    resolved = apply_values(project, {}, remove_notset=False)
    assert isinstance(resolved, dict)
    pools = {d["name"]: d["work_pool"]["name"] for d in resolved["deployments"]}
    assert set(pools.values()) == {"local-process-staging"}, pools


def test_dev_stack_keeps_its_home_ports_pool_and_buckets(tmp_path: Path) -> None:
    stack = Stack(stack_home(tmp_path, "dev"), Ports.of("dev"))

    assert stack.home == (tmp_path / "stack").resolve()
    assert Ports.of("dev") == Ports()
    assert stack.pool == "local-process"
    assert [stack.bucket(b) for b in BUCKETS] == list(BUCKETS)


def test_environments_stacks_share_no_port_and_live_apart(tmp_path: Path) -> None:
    ports = {env: set(Ports.of(env).__dict__.values()) for env in ENVIRONMENTS}
    assert not ports["dev"] & ports["staging"]
    assert not ports["dev"] & ports["prod"]
    assert not ports["staging"] & ports["prod"]
    homes = {stack_home(tmp_path, env) for env in ENVIRONMENTS}
    assert len(homes) == 3


def test_a_staging_stack_runs_its_services_in_staging(tmp_path: Path) -> None:
    stack = Stack(stack_home(tmp_path, "staging"), Ports.of("staging"), env="staging")
    stack.ensure_secrets()

    programs = stack._programs()

    worker_cmd, worker_env, _ = programs["prefect-worker"]
    assert worker_cmd[worker_cmd.index("--pool") + 1] == "local-process-staging"
    assert worker_env["PREFECT_WORK_POOL"] == "local-process-staging"
    for name in ("prefect-worker", "predictor", "jobs-worker-1"):
        assert programs[name][1]["MLOPS_ENV"] == "staging", name
    assert "s3://mlflow-staging/" in programs["mlflow"][0]
    assert stack.env()["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{Ports().mlflow + 100}"


def test_compose_publishes_every_port_through_a_variable() -> None:
    compose = (ROOT / "infra/docker/compose.yml").read_text()
    published = re.findall(r'^\s+- "127\.0\.0\.1:(.+):\d+"', compose, re.M)
    assert published
    assert all(re.fullmatch(r"\$\{[A-Z_]+_PORT:-\d+\}", p) for p in published), published
