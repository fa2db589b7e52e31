"""What can be checked of the compose stack without a Docker engine (none runs here).

The compose file against the compose-spec schema, its internal references (services,
volumes, build contexts, Dockerfiles, dependency groups), its variables against
.env.example, healthchecks and start-up ordering; every Dockerfile with hadolint. And the
locks: every secret required and without a default, none on a command line, no service
but the init jobs with the superuser or a root key, each service its own identities,
MLflow's basic-auth app and Host allow-list, Prefect's auth string and CSRF, Evidently's
write secret.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.registry.access import FLOWS, PREDICTOR, auth_config
from scripts.stack import JOB_WORKERS, PG_ROLES, SECRETS, Ports, Stack

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "infra/docker"
COMPOSE = DOCKER / "compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile*") if p.suffix != ".dockerignore")
ONE_SHOT = {"minio-init", "mlflow-init", "db-migrate"}
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
    "mlflow-init",
    "db-migrate",
    "worker",
}
SECRET = re.compile(r"^[A-Z_]*(PASSWORD|SECRET|SECRET_KEY|AUTH_STRING)$")
INTERPOLATED = re.compile(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)")
"""A `${VAR}` compose fills in (`$${VAR}` is the container's own shell variable)."""
URL_PASSWORD = re.compile(r"://[^/:@\s]+:[^@\s]+@")


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


def test_clients_start_after_the_migrations_and_their_mlflow_users(
    compose: dict[str, Any],
) -> None:
    for name in ("prefect-worker", "predictor", "worker"):
        needs = compose["services"][name]["depends_on"]
        for job in ("db-migrate", "mlflow-init"):
            assert needs[job]["condition"] == "service_completed_successfully", (name, job)
    migrate = compose["services"]["db-migrate"]
    assert migrate["command"] == ["python", "-m", "common.store", "upgrade"]
    assert "//mlops_owner:" in migrate["environment"]["DATABASE_URL"]


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


def test_job_workers_run_as_two_replicas_of_the_flows_image_with_a_metrics_healthcheck(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    worker = services["worker"]
    argv = worker["command"]
    assert argv[:3] == ["python", "-m", "services.worker"]
    assert "--idle-exit" not in argv  # `restart: unless-stopped` would start it again
    port = argv[argv.index("--metrics-port") + 1]
    assert f"127.0.0.1:{port}/metrics" in " ".join(worker["healthcheck"]["test"])
    assert worker["deploy"]["replicas"] == 2
    assert "ports" not in worker  # replicas cannot share a published port
    assert "volumes" not in worker  # stateless: any replica may die, none keeps data
    assert (worker["image"], worker["build"]) == (
        services["prefect-worker"]["image"],
        services["prefect-worker"]["build"],
    )
    assert set(worker["depends_on"]) >= {"postgres", "db-migrate", "mlflow", "mlflow-init"}
    env = worker["environment"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["JOB_CALLBACK_SECRET"].startswith("${JOB_CALLBACK_SECRET:?")
    assert env["MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"] == "false"  # no route to MinIO needed


def test_make_up_runs_the_job_workers_as_compose_does(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """scripts/stack.py's supervisord programs: compose's `worker`, one per replica."""
    worker = compose["services"]["worker"]
    stack = Stack(tmp_path, Ports())
    stack.secrets = {name: f"secret-{i}" for i, name in enumerate(SECRETS)}
    stack.write_conf()
    conf = configparser.RawConfigParser()
    conf.read(stack.conf)
    assert len(JOB_WORKERS) == worker["deploy"]["replicas"]
    ports = set()
    for name in JOB_WORKERS:
        program = conf[f"program:{name}"]
        argv = shlex.split(program["command"])
        # its venv's python, its own port, 127.0.0.1 (the default) where compose has 0.0.0.0
        compose_argv = worker["command"][: worker["command"].index("--metrics-host")]
        assert argv[1:-1] == compose_argv[1:-1]
        ports.add(argv[-1])
        assert stack.health_urls()[name] == f"http://127.0.0.1:{argv[-1]}/metrics"
        assert int(program["stopwaitsecs"]) > 30  # the batch in hand: the visibility timeout
        env = dict(re.findall(r'(\w+)="([^"]*)"', program["environment"]))
        assert env["DATABASE_URL"].startswith("postgresql://mlops_worker:secret-")
        for same in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"):
            assert env[same] == worker["environment"][same], same
        assert env["JOB_CALLBACK_SECRET"] == stack.secrets["JOB_CALLBACK_SECRET"]
    assert len(ports) == len(JOB_WORKERS)


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


def _secrets_used() -> set[str]:
    return {name for name in VAR.findall(COMPOSE.read_text()) if SECRET.match(name)}


def test_secrets_have_no_defaults_and_fail_fast() -> None:
    """Each secret is `${VAR:?...}` where first needed, never `${VAR:-...}`, empty in the
    example file. A profile's service may name one plainly only if another requires it."""
    text, env = COMPOSE.read_text(), ENV_EXAMPLE.read_text()
    secrets = _secrets_used()
    assert len(secrets) >= 17, secrets
    # Grafana's admin password belongs to its profile alone, where `:?` would stop a plain
    # `up`: an empty default there, refused by the service's entrypoint instead.
    grafana = json.dumps(yaml.safe_load(text)["services"]["grafana"]["entrypoint"])
    assert '[ -n \\"$$GF_SECURITY_ADMIN_PASSWORD\\" ]' in grafana
    for secret in secrets - {"GRAFANA_ADMIN_PASSWORD"}:
        assert not re.search(rf"\$\{{{secret}:?-", text), f"{secret} has a default"
        assert f"${{{secret}:?" in text, f"{secret} is not required anywhere"
    for secret in secrets:
        assert re.search(rf"^{secret}=$", env, re.M), f".env.example: {secret}= (empty)"


def test_no_secret_is_on_a_command_line(compose: dict[str, Any]) -> None:
    """argv is visible to every process on the host (`ps`); environments are not."""
    for name, svc in compose["services"].items():
        for key in ("command", "entrypoint"):
            argv = json.dumps(svc.get(key, ""))
            assert not [v for v in INTERPOLATED.findall(argv) if SECRET.match(v)], (name, key)
            assert not URL_PASSWORD.search(argv), (name, key)


def test_no_service_but_the_init_jobs_has_the_superuser_or_a_root_key(
    compose: dict[str, Any],
) -> None:
    holders = {
        "POSTGRES_PASSWORD": {"postgres"},  # the server itself: initdb makes the roles
        "MINIO_ROOT_PASSWORD": {"minio", "minio-init"},
        "MLFLOW_AUTH_ADMIN_PASSWORD": {"mlflow", "mlflow-init"},  # MLflow's bootstrap admin
    }
    for name, svc in compose["services"].items():
        used = set(INTERPOLATED.findall(json.dumps(svc)))
        for secret, allowed in holders.items():
            assert secret not in used or name in allowed, f"{name} holds {secret}"
    for name, svc in compose["services"].items():
        env = svc.get("environment", {})
        assert "MINIO_ROOT_USER" not in env or name == "minio", name
        assert env.get("AWS_ACCESS_KEY_ID") in {None, "mlflow", "flows"}, name


def test_each_service_logs_in_as_its_own_identity(compose: dict[str, Any]) -> None:
    services = compose["services"]

    def env(name: str) -> dict[str, str]:
        return dict(services[name]["environment"])

    assert "//mlops_predictor:" in env("predictor")["DATABASE_URL"]
    assert "//mlops_flows:" in env("prefect-worker")["DATABASE_URL"]
    assert env("worker")["DATABASE_URL"].startswith(
        "postgresql://mlops_worker:${POSTGRES_WORKER_PASSWORD:?"
    )
    # The job workers only read models: the predictor's read-only MLflow user, no S3 key.
    assert env("worker")["MLFLOW_TRACKING_USERNAME"] == PREDICTOR.name
    assert env("worker")["MLFLOW_TRACKING_PASSWORD"].startswith(f"${{{PREDICTOR.password_env}:?")
    assert "AWS_SECRET_ACCESS_KEY" not in env("worker")
    assert "//prefect:" in env("prefect-server")["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "postgresql+psycopg://mlflow@postgres:5432/mlflow" in services["mlflow"]["command"]
    assert env("mlflow")["PGPASSWORD"].startswith("${POSTGRES_MLFLOW_PASSWORD:?")
    assert env("predictor")["MLFLOW_TRACKING_USERNAME"] == PREDICTOR.name
    assert env("predictor")["MLFLOW_TRACKING_PASSWORD"] == f"${{{PREDICTOR.password_env}}}"
    assert env("prefect-worker")["MLFLOW_TRACKING_USERNAME"] == FLOWS.name
    assert "AWS_SECRET_ACCESS_KEY" not in env("predictor")  # models come through MLflow
    sources = yaml.safe_load(
        (DOCKER / "grafana/provisioning/datasources/datasources.yml").read_text()
    )
    (pg,) = [s for s in sources["datasources"] if s["type"] == "grafana-postgresql-datasource"]
    assert pg["user"] == "mlops_grafana"
    assert pg["secureJsonData"]["password"] == "${POSTGRES_GRAFANA_PASSWORD}"


def test_the_roles_script_makes_every_role_from_the_postgres_environment(
    compose: dict[str, Any],
) -> None:
    """initdb/roles.psql (also run by `make up`) gets each password from compose."""
    script = (DOCKER / "initdb/roles.psql").read_text()
    wanted = set(re.findall(r"^\\getenv \w+ (\w+)$", script, re.M))
    assert wanted == {env for _, env in PG_ROLES.values()}
    assert wanted <= set(compose["services"]["postgres"]["environment"])
    for role, _ in PG_ROLES.values():
        assert re.search(rf"^ALTER ROLE {role} LOGIN .*NOSUPERUSER", script, re.M), role
    checks = (DOCKER / "initdb/10-roles.sh").read_text()
    assert all(f"${{{env}:?}}" in checks for env in wanted)


def test_mlflow_runs_basic_auth_with_the_champion_rule_behind_a_host_allow_list(
    compose: dict[str, Any],
) -> None:
    mlflow = compose["services"]["mlflow"]
    argv = mlflow["command"]
    assert argv[argv.index("--app-name") + 1] == "mlops-auth"
    hosts = argv[argv.index("--allowed-hosts") + 1].split(",")
    assert "*" not in hosts
    assert {"mlflow:5000", "127.0.0.1:5000", "localhost:5000"} <= set(hosts)
    assert mlflow["build"]["args"]["GROUP"] == "mlflow-server"  # Flask-WTF: mlflow[auth]
    config = mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"]
    (mount,) = [v for v in mlflow["volumes"] if v.split(":")[1] == config]
    ini = (COMPOSE.parent / mount.split(":")[0]).read_text()
    assert ini == auth_config("postgresql+psycopg://mlflow@postgres:5432/mlflow_auth")
    assert "default_permission = NO_PERMISSIONS" in ini
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert mlflow["environment"][name].startswith(f"${{{name}:?")


def test_prefect_wants_its_auth_string_and_csrf_tokens(compose: dict[str, Any]) -> None:
    server = compose["services"]["prefect-server"]["environment"]
    worker = compose["services"]["prefect-worker"]["environment"]
    assert server["PREFECT_SERVER_API_AUTH_STRING"].startswith("${PREFECT_API_AUTH_STRING:?")
    assert server["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"] == "true"
    assert worker["PREFECT_API_AUTH_STRING"].startswith("${PREFECT_API_AUTH_STRING:?")
    assert worker["PREFECT_CLIENT_CSRF_SUPPORT_ENABLED"] == "true"


def test_the_evidently_ui_wants_the_secret_its_uploader_sends(compose: dict[str, Any]) -> None:
    ui = compose["services"]["evidently"]["environment"]
    worker = compose["services"]["prefect-worker"]["environment"]
    assert ui["EVIDENTLY_SECRET"].startswith("${EVIDENTLY_SECRET:?")
    assert worker["EVIDENTLY_SECRET"].startswith("${EVIDENTLY_SECRET:?")


def test_minio_users_get_policies_on_existing_buckets_only(compose: dict[str, Any]) -> None:
    init = compose["services"]["minio-init"]
    script = init["entrypoint"][-1]
    buckets = set(re.findall(r"stack/(\w+)", script.split("\n", 2)[1]))
    assert buckets == {"mlflow", "dvc", "evidently"}
    users = re.findall(r"^add_user (\w+) ", script, re.M)
    assert sorted(users) == ["flows", "mlflow"]
    (mount,) = init["volumes"]
    for user in users:
        policy = json.loads((COMPOSE.parent / mount.split(":")[0] / f"{user}.json").read_text())
        for statement in policy["Statement"]:
            assert statement["Effect"] == "Allow"
            for resource in statement["Resource"]:
                bucket = resource.removeprefix("arn:aws:s3:::").split("/")[0]
                assert bucket in buckets, (user, resource)
            assert not any(a in {"s3:*", "admin:*"} for a in statement["Action"]), user
    services = compose["services"]
    assert services["mlflow"]["environment"]["AWS_ACCESS_KEY_ID"] == "mlflow"
    assert services["prefect-worker"]["environment"]["AWS_ACCESS_KEY_ID"] == "flows"


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


def test_grafana_reads_no_prediction_log_table() -> None:
    """Its role may read the monitoring tables only; traffic comes from Prometheus."""
    for path in sorted((DOCKER / "grafana/dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                tables = re.findall(r"\b(?:FROM|JOIN)\s+(\w+)", target.get("rawSql", ""), re.I)
                assert set(tables) <= {"monitoring_runs", "monitoring_metrics"}, panel["title"]


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


def _shell_scripts(compose: dict[str, Any]) -> list[tuple[str, str]]:
    """Every `sh -c` script of a command or entrypoint, `$$` turned back into `$`."""
    found = []
    for name, svc in compose["services"].items():
        for key in ("command", "entrypoint"):
            argv = svc.get(key)
            if isinstance(argv, list) and argv[:2] == ["/bin/sh", "-c"]:
                found.append((f"{name} {key}", argv[2].replace("$$", "$")))
    return found


def test_entrypoint_shell_scripts_parse(compose: dict[str, Any]) -> None:
    scripts = _shell_scripts(compose)
    scripts.append(("initdb/10-roles.sh", (DOCKER / "initdb/10-roles.sh").read_text()))
    assert len(scripts) >= 4
    for where, script in scripts:
        proc = subprocess.run(
            ["sh", "-n", "-c", script], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, f"{where}: {proc.stderr}"
