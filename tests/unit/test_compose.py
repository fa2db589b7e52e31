"""What can be checked of the compose stack without a Docker engine (none runs here).

The compose file against the compose-spec schema, its internal references (services,
volumes, build contexts, Dockerfiles, dependency groups), its variables against
.env.example, healthchecks and start-up ordering; every Dockerfile with hadolint.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "infra/docker"
COMPOSE = DOCKER / "compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile*") if p.suffix != ".dockerignore")
ONE_SHOT = {"minio-init"}
GENERATED = {ROOT / "build/bento"}
"""Build contexts made by a documented step (the exported Bento), absent from a checkout."""
VAR = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::?[-?][^}]*)?\}")
EXPECTED_SERVICES = {
    "postgres",
    "minio",
    "minio-init",
    "mlflow",
    "prefect-server",
    "prefect-worker",
    "evidently",
    "predictor",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def _builds(compose: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, svc["build"]) for name, svc in compose["services"].items() if "build" in svc]


def _context(build: dict[str, Any]) -> Path:
    return (COMPOSE.parent / str(build["context"])).resolve()


def _dockerfile(build: dict[str, Any]) -> Path:
    """Compose resolves `dockerfile` from the context, even when it leaves the context."""
    return (_context(build) / str(build.get("dockerfile", "Dockerfile"))).resolve()


def test_compose_file_matches_the_compose_specification() -> None:
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_stack_has_every_service_of_the_design(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) >= EXPECTED_SERVICES


def test_depends_on_names_existing_services_with_health_conditions(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        for target, spec in svc.get("depends_on", {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            want = "service_completed_successfully" if target in ONE_SHOT else "service_healthy"
            assert spec["condition"] == want, f"{name} -> {target}"


def test_worker_starts_after_the_servers_its_flows_call(compose: dict[str, Any]) -> None:
    needs = set(compose["services"]["prefect-worker"]["depends_on"])
    assert {"prefect-server", "mlflow", "postgres", "evidently"} <= needs


def test_worker_deploys_then_serves_the_pool_with_a_health_server(
    compose: dict[str, Any],
) -> None:
    worker = compose["services"]["prefect-worker"]
    script = " ".join(worker["command"])
    assert script.index("deploy --all") < script.index("exec prefect worker start")
    assert "--with-healthcheck" in script
    port = worker["environment"]["PREFECT_WORKER_WEBSERVER_PORT"]
    assert f"127.0.0.1:{port}/health" in " ".join(worker["healthcheck"]["test"])
    assert worker["environment"]["MLOPS_PROJECT_DIR"] == "/app"


def test_every_server_has_a_healthcheck_and_restart_policy(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        if name in ONE_SHOT:
            continue
        assert "healthcheck" in svc, name
        assert svc.get("restart") == "unless-stopped", name


def test_published_ports_listen_on_loopback_only(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"


def test_named_volumes_are_declared_and_bind_mounts_exist(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes", {}))
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"


def test_build_contexts_and_dockerfiles_exist(compose: dict[str, Any]) -> None:
    for name, build in _builds(compose):
        context, dockerfile = _context(build), _dockerfile(build)
        assert dockerfile.is_file(), f"{name}: {dockerfile}"
        assert dockerfile.is_relative_to(ROOT), f"{name}: {dockerfile}"
        if context not in GENERATED:
            assert context.is_dir(), f"{name}: {context}"
        if "target" in build:
            stages = re.findall(r"^FROM \S+ AS (\S+)", dockerfile.read_text(), re.M)
            assert build["target"] in stages, f"{name}: no stage {build['target']}"


def test_build_groups_are_dependency_groups_of_the_project(compose: dict[str, Any]) -> None:
    groups = tomllib.loads((ROOT / "pyproject.toml").read_text())["dependency-groups"]
    for name, build in _builds(compose):
        group = build.get("args", {}).get("GROUP")
        if group:
            assert group in groups, f"{name}: GROUP={group}"


def test_prefect_server_uses_postgres_through_a_locked_asyncpg(compose: dict[str, Any]) -> None:
    env = compose["services"]["prefect-server"]["environment"]
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"].endswith("@postgres:5432/prefect")
    assert re.search(r'^name = "asyncpg"$', (ROOT / "uv.lock").read_text(), re.M)


def test_every_variable_is_documented_in_env_example() -> None:
    used = set(VAR.findall(COMPOSE.read_text()))
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.M))
    assert used - documented == set()


def test_secrets_have_no_defaults_and_fail_fast() -> None:
    text = COMPOSE.read_text()
    for secret in ("POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY"):
        assert f"${{{secret}:-" not in text
        assert f"${{{secret}:?" in text
    env = ENV_EXAMPLE.read_text()
    assert re.search(r"^POSTGRES_PASSWORD=$", env, re.M)
    assert re.search(r"^AWS_SECRET_ACCESS_KEY=$", env, re.M)


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        image = svc.get("image", "")
        if "build" in svc:
            continue
        assert ":" in image, name
        assert not image.endswith(":latest"), name


def test_there_are_dockerfiles_to_check() -> None:
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile", "Dockerfile.predictor"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    proc = subprocess.run(
        [str(hadolint), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _stage_users(text: str) -> dict[str, str]:
    """The user each stage runs as: its last USER, else its parent stage's, else root."""
    users: dict[str, str] = {}
    for block in re.split(r"^(?=FROM )", text, flags=re.M)[1:]:
        header = re.match(r"FROM (\S+)(?: AS (\S+))?", block)
        assert header, block
        base, name = header.groups()
        found = re.findall(r"^USER (\S+)", block, re.M)
        users[name or f"stage {len(users)}"] = found[-1] if found else users.get(base, "root")
    return users


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_images_run_as_uid_10001(dockerfile: Path, compose: dict[str, Any]) -> None:
    users = _stage_users(dockerfile.read_text())
    targets = {
        build["target"]
        for _, build in _builds(compose)
        if "target" in build and _dockerfile(build) == dockerfile.resolve()
    }
    for stage in {*targets, list(users)[-1]}:
        assert users[stage] == "10001:10001", f"{dockerfile.name} stage {stage}: {users[stage]}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_bases_are_pinned(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    stages = set(re.findall(r"^FROM \S+ AS (\S+)", text, re.M))
    bases = re.findall(r"^(?:ARG PYTHON_IMAGE=|FROM )(\S+)", text, re.M)
    assert bases
    for base in bases:
        if base.startswith("${") or base in stages:
            continue
        assert re.search(r":\d+\.\d+", base), base


def test_profile_services_require_no_variable(compose: dict[str, Any]) -> None:
    """Compose interpolates every service before it applies profiles: a `${VAR:?}` in an
    optional service would stop a plain `docker compose up`."""
    required = re.compile(r"\$\{[A-Z_][A-Z0-9_]*\??:?\?")
    for name, svc in compose["services"].items():
        if svc.get("profiles"):
            assert not required.search(json.dumps(svc)), name


def test_grafana_dashboards_use_the_provisioned_data_sources(compose: dict[str, Any]) -> None:
    grafana = DOCKER / "grafana"
    sources = yaml.safe_load((grafana / "provisioning/datasources/datasources.yml").read_text())
    uids = {s["uid"]: s["type"] for s in sources["datasources"]}
    provider = yaml.safe_load((grafana / "provisioning/dashboards/dashboards.yml").read_text())
    mounts = {v.split(":")[1] for v in compose["services"]["grafana"]["volumes"]}
    assert provider["providers"][0]["options"]["path"] in mounts
    dashboards = sorted((grafana / "dashboards").glob("*.json"))
    assert dashboards
    for path in dashboards:
        for panel in json.loads(path.read_text())["panels"]:
            for ref in (panel["datasource"], *(t["datasource"] for t in panel["targets"])):
                assert uids.get(ref["uid"]) == ref["type"], f"{path.name}: {panel['title']}"
