"""`make up` without Docker: the compose topology as local processes, used for real.

One stack on free ports, its worker deploying a throwaway project: `train` runs through the
worker against the MLflow server (PostgreSQL backend, S3 artifacts), the predictor serves
the new champion, traffic is logged, `monitor` runs through the worker into PostgreSQL and
the Evidently UI; then the operations: MLflow and the predictor restarted mid-traffic,
`mlflow db upgrade`, backup and restore; `down` last. The locks are checked on the way:
MLflow, Prefect and the Evidently UI refuse requests without credentials, each service
logs in as its own identity, and no secret is on a command line or in a log.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import httpx
import mlflow.artifacts
import psutil
import psycopg
import pytest
from mlflow.exceptions import MlflowException
from mlflow.server.auth.client import AuthServiceClient
from mlflow.tracking import MlflowClient

from common.store import connect, jobs, tenants
from models.generate import generate
from scripts.stack import JOB_WORKERS, PG_ROLES, Ports, Stack
from tests.servers import (
    STARTUP_TIMEOUT,
    VENV_BIN,
    Server,
    clean_env,
    free_port,
    http_ok,
    run_ok,
)
from tests.workspace import ROOT, Workspace, add_deployments, make_workspace

MODEL = "churn-classifier"
TRAFFIC_ROWS = 400


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    ws = make_workspace(
        tmp_path_factory.mktemp("stack") / "ws",
        # A small window may decide; thresholds no distance reaches, so no retrain fires.
        {"monitor": {"min_rows": 100, "num_threshold": 50.0, "cat_threshold": 50.0}},
    )
    add_deployments(ws)
    return ws


@pytest.fixture(scope="module")
def stack(workspace: Workspace) -> Iterator[Stack]:
    home = Path(tempfile.mkdtemp(prefix="mlops-it-stack-"))
    home.chmod(0o755)  # the postgres program runs as the `postgres` user
    stack = Stack(home / "stack", Ports(*(free_port() for _ in fields(Ports))), workspace.path)
    try:
        stack.up(timeout=STARTUP_TIMEOUT)
        # This process's MLflow clients sign in as the operator (stack.env's admin).
        with pytest.MonkeyPatch.context() as env:
            for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                env.setenv(name, stack.env()[name])
            yield stack
    finally:
        stack.down()
        shutil.rmtree(home, ignore_errors=True)


def _cli_env(stack: Stack) -> dict[str, str]:
    """The stack's client environment (what `source stack.env` gives)."""
    env = clean_env(**stack.env())
    env.pop("PREFECT__FLOW_RUN_ID", None)
    return env


def _cli(stack: Stack, *cmd: str, timeout: float = 300) -> str:
    """A command run with the stack's client environment."""
    return run_ok(cmd, cwd=stack.project, env=_cli_env(stack), timeout=timeout)


def _run_deployment(stack: Stack, name: str, timeout: int = 600) -> str:
    return _cli(
        stack,
        *(sys.executable, "-m", "prefect", "deployment", "run", name),
        *("--watch", "--watch-timeout", str(timeout)),
        timeout=timeout + 30,
    )


def _client(stack: Stack) -> MlflowClient:
    uri = stack.env()["MLFLOW_TRACKING_URI"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _evidently_write(stack: Stack) -> dict[str, str]:
    return {"evidently-secret": stack.secrets["EVIDENTLY_SECRET"]}


@pytest.fixture(scope="module")
def trained(stack: Stack) -> str:
    """One run of the `train` deployment through the worker; then the predictor serves it."""
    out = _run_deployment(stack, "pipeline/pipeline")
    assert stack.serve_if_champion(timeout=STARTUP_TIMEOUT)
    return out


@pytest.fixture(scope="module")
def key(stack: Stack, trained: str) -> str:
    """A key of the default tenant, made in the predictor's database once it is migrated."""
    return tenants.create_key(stack.pg.url("predictions"), tenants.DEFAULT_TENANT).secret


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _post(url: str, key: str, records: list[dict[str, Any]], deadline: float) -> list[str]:
    """POST until answered (a restarting predictor refuses connections); the request ids."""
    while True:
        try:
            resp = httpx.post(
                f"{url}/predict", json={"records": records}, headers=_auth(key), timeout=30
            )
            if resp.status_code == 200:
                return [p["request_id"] for p in resp.json()["predictions"]]
            assert resp.status_code >= 500, resp.text
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the predictor did not come back"
        time.sleep(0.2)


def _logged(stack: Stack, ids: list[str], timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    with psycopg.connect(stack.pg.url("predictions")) as conn:
        while True:
            row = conn.execute(
                "SELECT count(*) FROM predictions WHERE request_id = ANY(%s::uuid[])", (ids,)
            ).fetchone()
            n = int(row[0]) if row else 0
            if n == len(ids) or time.monotonic() > deadline:
                return n
            time.sleep(0.3)


def _traffic(workspace: Workspace, rows: int, seed: int) -> list[dict[str, Any]]:
    features = list(workspace.params()["data"]["features"])
    records: list[dict[str, Any]] = json.loads(
        generate(rows, seed=seed)[features].to_json(orient="records")
    )
    return records


def test_every_service_is_healthy_with_the_compose_variables(stack: Stack) -> None:
    states = stack.states()
    for name in (
        *("postgres", "s3", "mlflow", "prefect-server", "prefect-worker", "evidently"),
        *JOB_WORKERS,
    ):
        assert states.get(name) == "RUNNING", states
    for name, url in stack.health_urls().items():
        if name != "predictor":
            assert httpx.get(url, timeout=10).status_code == 200, name
    env = stack.env()
    for name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "DATABASE_URL", "EVIDENTLY_WORKSPACE"):
        assert name in env
    deployments = _cli(stack, sys.executable, "-m", "prefect", "deployment", "ls")
    for name in ("pipeline", "monitor", "retrain", "batch_score"):
        assert name in deployments


def test_mlflow_prefect_and_evidently_refuse_requests_without_credentials(stack: Stack) -> None:
    p, secret = stack.ports, stack.secrets
    search = f"http://127.0.0.1:{p.mlflow}/api/2.0/mlflow/experiments/search?max_results=1"
    admin = ("admin", secret["MLFLOW_AUTH_ADMIN_PASSWORD"])
    assert httpx.get(search).status_code == 401
    assert httpx.get(search, auth=("admin", "not-the-password")).status_code == 401
    assert httpx.get(search, auth=admin).status_code == 200
    assert httpx.get(search, auth=admin, headers={"Host": "evil.example"}).status_code == 403

    api = f"http://127.0.0.1:{p.prefect}/api"
    user, _, password = secret["PREFECT_API_AUTH_STRING"].partition(":")
    auth = (user, password)
    assert httpx.get(f"{api}/admin/version").status_code == 401
    assert httpx.get(f"{api}/admin/version", auth=("prefect", "wrong")).status_code == 401
    assert httpx.get(f"{api}/admin/version", auth=auth).status_code == 200
    # CSRF protection: a state-changing request needs a token the client fetched first.
    assert httpx.post(f"{api}/flows/filter", json={}, auth=auth).status_code == 403
    token = httpx.get(f"{api}/csrf-token", params={"client": "t"}, auth=auth).json()["token"]
    csrf = {"Prefect-Csrf-Token": token, "Prefect-Csrf-Client": "t"}
    assert httpx.post(f"{api}/flows/filter", json={}, headers=csrf).status_code == 401
    assert httpx.post(f"{api}/flows/filter", json={}, auth=auth, headers=csrf).status_code == 200

    ui = f"http://127.0.0.1:{p.evidently}/api/v2/projects"
    project = {"name": "anonymous", "description": ""}
    assert httpx.post(ui, json=project).status_code == 403
    assert httpx.post(ui, json=project, headers={"evidently-secret": "wrong"}).status_code == 403
    created = httpx.post(ui, json=project, headers=_evidently_write(stack))
    assert created.status_code < 300, created.text
    gone = httpx.delete(f"{ui}/{created.json()}", headers=_evidently_write(stack))
    assert gone.status_code < 300, gone.text


def test_secrets_are_private_files_never_on_a_command_line_or_in_a_log(stack: Stack) -> None:
    for name in ("secrets.env", "stack.env", "supervisord.conf"):
        assert stat.S_IMODE((stack.home / name).stat().st_mode) == 0o600, name
    values = [v.rpartition(":")[2] for v in stack.secrets.values()]
    assert len(values) == len(set(values)) >= 13  # one each, none shared
    pids = [int(p) for p in stack.ctl("pid", "all", check=False).split() if p.isdigit()]
    procs = [psutil.Process(p) for p in pids if p and psutil.pid_exists(p)]
    for proc in procs + [c for p in procs for c in p.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            cmdline = " ".join(proc.cmdline())
            assert not [v for v in values if v in cmdline], cmdline
    for log in [*stack.logs.glob("*.log"), stack.home / "supervisord.log", stack.pg.log_path]:
        text = log.read_text(errors="replace") if log.is_file() else ""
        assert not [v for v in values if v in text], log


def test_train_runs_through_the_worker_into_postgres_and_s3(stack: Stack, trained: str) -> None:
    assert "Completed" in trained, trained + (stack.logs / "prefect-worker.log").read_text()[-3000:]
    (version,) = _client(stack).search_model_versions(f"name = '{MODEL}'")
    assert version.tags.get("prefect.flow_run_id")
    assert _client(stack).get_model_version_by_alias(MODEL, "champion").version == version.version
    with psycopg.connect(stack.pg.url("mlflow")) as conn:
        row = conn.execute("SELECT count(*) FROM model_versions").fetchone()
    assert row == (1,)
    objects = stack.s3().list_objects_v2(Bucket="mlflow").get("KeyCount", 0)
    assert objects > 0  # artifacts went through the server to S3


def test_the_predictor_serves_the_champion_and_monitor_runs_on_its_traffic(
    stack: Stack, trained: str, key: str, workspace: Workspace
) -> None:
    url = f"http://127.0.0.1:{stack.ports.predictor}"
    records = _traffic(workspace, TRAFFIC_ROWS, seed=101)
    ids: list[str] = []
    deadline = time.monotonic() + 120
    for i in range(0, len(records), 100):
        ids += _post(url, key, records[i : i + 100], deadline)
    assert _logged(stack, ids) == TRAFFIC_ROWS

    out = _run_deployment(stack, "monitor/monitor")
    assert "Completed" in out, out + (stack.logs / "prefect-worker.log").read_text()[-3000:]
    with psycopg.connect(stack.pg.url("predictions")) as conn:
        row = conn.execute(
            "SELECT model_version, current_rows, enough_rows, evidently_project "
            "FROM monitoring_runs ORDER BY window_end DESC LIMIT 1"
        ).fetchone()
    assert row is not None
    version, current_rows, enough_rows, project = row
    assert (version, current_rows, enough_rows) == ("1", TRAFFIC_ROWS, True)
    projects = httpx.get(stack.health_urls()["evidently"], timeout=30).json()
    assert project in {str(p["id"]) for p in projects}, projects
    snapshots = httpx.get(f"{stack.env()['EVIDENTLY_WORKSPACE']}/api/projects/{project}/snapshots")
    assert snapshots.status_code == 200, snapshots.text
    assert snapshots.json(), project


def test_the_two_job_workers_score_a_job_queued_by_the_predictors_role(
    stack: Stack, trained: str, workspace: Workspace
) -> None:
    records = _traffic(workspace, 50, seed=5)
    predictor = stack.db_url("predictor", "predictions")
    with connect(predictor) as conn:
        job, _ = jobs.submit(conn, tenants.DEFAULT_TENANT, records, chunk_records=10)
    deadline = time.monotonic() + 120
    while True:
        with connect(predictor) as conn:
            now = jobs.get(conn, tenants.DEFAULT_TENANT, job.id)
        assert now is not None
        if now.ended or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert now.status == "done", now
    with connect(predictor) as conn:
        answers = jobs.results(conn, tenants.DEFAULT_TENANT, job.id, offset=0, limit=100)
    assert [a["request_id"] for a in answers] == [jobs.request_id(job.id, i) for i in range(50)]
    for name in JOB_WORKERS:  # both polled the queues all along, as mlops_worker
        assert httpx.get(stack.health_urls()[name], timeout=10).status_code == 200


def test_only_the_flows_identity_may_move_an_alias(stack: Stack, trained: str) -> None:
    """The predictor (READ) may move no alias; the worker's `flows` moves `champion`."""
    uri = stack.env()["MLFLOW_TRACKING_URI"]
    as_predictor = {
        "MLFLOW_TRACKING_USERNAME": "predictor",
        "MLFLOW_TRACKING_PASSWORD": stack.predictor_env()["MLFLOW_TRACKING_PASSWORD"],
    }
    as_flows = {
        "MLFLOW_TRACKING_USERNAME": "flows",
        "MLFLOW_TRACKING_PASSWORD": stack.worker_env()["MLFLOW_TRACKING_PASSWORD"],
    }
    with pytest.MonkeyPatch.context() as env:
        for name, value in as_predictor.items():
            env.setenv(name, value)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        assert client.get_model_version_by_alias(MODEL, "champion").version == "1"
        for alias in ("champion", "challenger"):
            with pytest.raises(MlflowException, match="Permission denied"):
                client.set_registered_model_alias(MODEL, alias, "1")
        with pytest.raises(MlflowException, match="Permission denied"):
            client.set_model_version_tag(MODEL, "1", "alias.champion.set_by", "predictor")
        for name, value in as_flows.items():
            env.setenv(name, value)
        MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(
            MODEL, "champion", "1"
        )


def test_an_editor_may_propose_a_challenger_but_only_the_promotion_identity_moves_champion(
    stack: Stack, trained: str
) -> None:
    """mlops-auth adds what basic-auth lacks: EDIT on a model no longer moves `champion`."""
    uri = stack.env()["MLFLOW_TRACKING_URI"]
    with pytest.MonkeyPatch.context() as env:
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.setenv(name, stack.env()[name])
        admin = AuthServiceClient(uri)
        admin.create_user("analyst", "analyst-password-1")
        admin.grant_user_permission("analyst", "registered_model", MODEL, "EDIT")
        env.setenv("MLFLOW_TRACKING_USERNAME", "analyst")
        env.setenv("MLFLOW_TRACKING_PASSWORD", "analyst-password-1")
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.set_registered_model_alias(MODEL, "challenger", "1")
        with pytest.raises(MlflowException, match="only flows or an admin may move"):
            client.set_registered_model_alias(MODEL, "champion", "1")
        with pytest.raises(MlflowException, match="Permission denied"):  # basic-auth: MANAGE
            client.delete_registered_model_alias(MODEL, "champion")
        assert client.get_model_version_by_alias(MODEL, "champion").version == "1"


def test_each_service_logs_in_to_postgres_as_its_own_role(stack: Stack, trained: str) -> None:
    with psycopg.connect(stack.pg.url("postgres")) as conn:
        sessions = set(
            conn.execute(
                "SELECT datname, usename FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            ).fetchall()
        )
        superusers = {r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolsuper")}
        roles = {
            r[0]: r[1:]
            for r in conn.execute("SELECT rolname, rolsuper, rolcreaterole FROM pg_roles")
        }
    assert not {user for _, user in sessions} & superusers, sessions
    assert {("mlflow", "mlflow"), ("prefect", "prefect")} <= sessions
    assert ("predictions", "mlops_predictor") in sessions  # the predictor's feedback pool
    assert ("predictions", "mlops_worker") in sessions  # the job workers polling the queues
    assert roles["mlops_owner"] == (False, True)  # CREATEROLE for the tenants' read roles
    for name, _ in PG_ROLES.values():
        assert roles[name][0] is False, name
    predictor = stack.db_url("predictor", "mlflow")
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        psycopg.connect(predictor, connect_timeout=5)
    no_password = f"postgresql://mlflow@127.0.0.1:{stack.ports.postgres}/mlflow"
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(no_password, connect_timeout=5, passfile=os.devnull)


def test_restarting_mlflow_and_the_predictor_mid_traffic_loses_nothing(
    stack: Stack, trained: str, key: str, workspace: Workspace
) -> None:
    url = f"http://127.0.0.1:{stack.ports.predictor}"
    records = _traffic(workspace, 2_000, seed=202)
    acked: list[str] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def send() -> None:
        try:
            i = 0
            while not stop.is_set():
                deadline = time.monotonic() + STARTUP_TIMEOUT
                acked.extend(_post(url, key, [records[i % len(records)]], deadline))
                i += 1
        except BaseException as exc:  # re-raised by the test below
            errors.append(exc)

    client = _client(stack)
    runs_before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    sender = threading.Thread(target=send)
    sender.start()
    try:
        time.sleep(2)
        stack.ctl("restart", "mlflow")
        stack.wait_healthy("mlflow", timeout=STARTUP_TIMEOUT)
        before_predictor = len(acked)
        stack.ctl("restart", "predictor")
        stack.wait_healthy("predictor", timeout=STARTUP_TIMEOUT)
        time.sleep(2)
    finally:
        stop.set()
        sender.join(timeout=STARTUP_TIMEOUT + 30)
    assert not errors, errors
    assert len(acked) > before_predictor > 0  # traffic went on before and after the restarts
    assert _logged(stack, acked, timeout=60) == len(acked)
    # The registry and the runs are in PostgreSQL: the restarted server has them all.
    client = _client(stack)
    assert client.get_model_version_by_alias(MODEL, "champion").version == "1"
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == (
        runs_before
    )
    served = httpx.post(
        f"{url}/predict", json={"records": records[:1]}, headers=_auth(key), timeout=30
    ).json()
    assert served["predictions"][0]["model_version"] == "1"


def test_the_bento_built_by_make_bento_serves_its_champion_without_the_registry(
    stack: Stack, trained: str, key: str, workspace: Workspace, tmp_path: Path
) -> None:
    """infra/docker/Dockerfile.predictor's build context and command, without Docker."""
    bento = tmp_path / "bento"
    env = {"BENTOML_HOME": str(tmp_path / "bentoml"), "BENTO_DIR": str(bento)}
    _cli(stack, "make", "-s", "-C", str(ROOT), "bento", *(f"{k}={v}" for k, v in env.items()))
    assert (bento / "bento.yaml").is_file()
    assert list(bento.glob("models/predictor-model/*/MLmodel")), "the champion is not inside"
    assert (bento / "env/python/requirements.txt").is_file()  # what the image installs
    port = free_port()
    served = Server(
        "bento",
        [
            str(VENV_BIN / "bentoml"),
            "serve",
            str(bento),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        log_path=tmp_path / "bento.log",
        healthy=http_ok(f"http://127.0.0.1:{port}/readyz"),
        env=clean_env(
            **{
                **stack.env(),
                "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",  # no registry answers
                "BENTOML_HOME": str(tmp_path / "serve-home"),
                "MLOPS_HOME": str(tmp_path / "state"),
            }
        ),
        cwd=tmp_path,
    )
    with served:
        resp = httpx.post(
            f"http://127.0.0.1:{port}/predict",
            json={"records": _traffic(workspace, 3, seed=7)},
            headers=_auth(key),
            timeout=30,
        )
    assert resp.status_code == 200, resp.text
    assert resp.json()["model_version"] == "1"


def _ops(stack: Stack, *args: str) -> str:
    return _cli(
        stack, sys.executable, "-m", "scripts.ops", "--home", str(stack.home), *args, timeout=900
    )


def test_mlflow_db_upgrade_is_a_scripted_step_with_a_backup_first(
    stack: Stack, trained: str
) -> None:
    out = _ops(stack, "db-upgrade")
    assert "schema is at this MLflow's head" in out
    assert list((Path(stack.env()["MLOPS_HOME"]) / "backups").glob("mlflow-before-upgrade-*.dump"))
    assert httpx.get(stack.health_urls()["mlflow"], timeout=10).status_code == 200
    assert _client(stack).get_model_version_by_alias(MODEL, "champion").version == "1"


def _database_oids(stack: Stack) -> dict[str, int]:
    with psycopg.connect(stack.pg.url("postgres")) as conn:
        return {str(n): int(o) for n, o in conn.execute("SELECT datname, oid FROM pg_database")}


def test_a_restore_failing_after_the_services_stopped_leaves_them_stopped_and_live_data(
    stack: Stack, trained: str, tmp_path: Path
) -> None:
    """Row counts that differ from the manifest fail the restore before any swap."""
    dest = tmp_path / "backup"
    _ops(stack, "backup", "--dest", str(dest))
    bad = json.loads((dest / "manifest.json").read_text())
    bad["databases"]["predictions"]["tables"]["public.predictions"] = -1
    (dest / "manifest.json").write_text(json.dumps(bad))
    before = _database_oids(stack)
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.ops", "--home", str(stack.home), "restore", str(dest)],
        cwd=stack.project,
        env=_cli_env(stack),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout
    assert "restore failed before anything live was touched" in proc.stderr, proc.stderr
    assert "public.predictions: " in proc.stderr
    assert "start-clients" in proc.stderr
    states = stack.states()
    assert states["mlflow"] != "RUNNING"
    assert states["predictor"] != "RUNNING"
    assert _database_oids(stack) == before  # the same live databases, no copy left beside
    _ops(stack, "start-clients")
    stack.wait_healthy(
        "mlflow", "prefect-server", "predictor", "evidently", timeout=STARTUP_TIMEOUT
    )


def test_backup_then_restore_brings_back_databases_and_buckets(
    stack: Stack, trained: str, tmp_path: Path
) -> None:
    with psycopg.connect(stack.pg.url("predictions")) as conn:
        row = conn.execute("SELECT count(*) FROM predictions").fetchone()
    logged = row[0] if row else 0
    assert logged > 0
    s3 = stack.s3()
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="mlflow")["Contents"])
    dest = tmp_path / "backup"
    _ops(stack, "backup", "--dest", str(dest))
    manifest = json.loads((dest / "manifest.json").read_text())
    assert set(manifest["databases"]) == {"mlflow", "mlflow_auth", "prefect", "predictions"}
    assert manifest["databases"]["mlflow"]["owner"] == "mlflow"
    assert sorted(o["key"] for o in manifest["buckets"]["mlflow"]["objects"]) == keys
    assert manifest["files"]["evidently"]["entries"]
    # The same backup through --pg-url/--s3-endpoint (how one backs up compose from its host).
    remote = tmp_path / "by-url"
    _cli(
        stack,
        *(sys.executable, "-m", "scripts.ops", "--pg-url", stack.pg.url("").rstrip("/")),
        *("--s3-endpoint", stack.env()["MLFLOW_S3_ENDPOINT_URL"], "backup", "--dest", str(remote)),
    )
    by_url = json.loads((remote / "manifest.json").read_text())
    assert by_url["buckets"] == manifest["buckets"]
    assert set(by_url["databases"]) == set(manifest["databases"])

    assert (dest / "evidently").is_dir()
    projects = httpx.get(stack.health_urls()["evidently"], timeout=30).json()
    assert projects

    # Lose things: the prediction log, the registered model, the artifacts, the reports.
    with psycopg.connect(stack.pg.url("predictions")) as conn:
        conn.execute("DELETE FROM predictions")
    for project in projects:
        gone = httpx.delete(
            f"{stack.health_urls()['evidently']}/{project['id']}",
            headers=_evidently_write(stack),
            timeout=30,
        )
        assert gone.status_code < 300, gone.text
    assert httpx.get(stack.health_urls()["evidently"], timeout=30).json() == []
    _client(stack).delete_registered_model(MODEL)
    s3.delete_objects(Bucket="mlflow", Delete={"Objects": [{"Key": k} for k in keys]})

    _ops(stack, "restore", str(dest))
    with psycopg.connect(stack.pg.url("predictions")) as conn:
        row = conn.execute("SELECT count(*) FROM predictions").fetchone()
    assert row == (logged,)
    with psycopg.connect(stack.pg.url("mlflow")) as conn:  # owners and CONNECT rights kept
        row = conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'runs'").fetchone()
    assert row == ("mlflow",)
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        psycopg.connect(stack.db_url("predictor", "mlflow"), connect_timeout=5)
    assert sorted(o["Key"] for o in s3.list_objects_v2(Bucket="mlflow")["Contents"]) == keys
    stack.wait_healthy(
        "mlflow", "prefect-server", "prefect-worker", "predictor", "evidently", timeout=180
    )
    restored = httpx.get(stack.health_urls()["evidently"], timeout=30).json()
    assert {p["id"] for p in restored} == {p["id"] for p in projects}
    client = _client(stack)
    assert client.get_model_version_by_alias(MODEL, "champion").version == "1"
    model_dir = tmp_path / "model"
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri(MODEL, "1"),
        dst_path=str(model_dir),
        tracking_uri=stack.env()["MLFLOW_TRACKING_URI"],
    )
    assert (Path(local) / "MLmodel").is_file(), sorted(model_dir.rglob("*"))


def test_down_stops_everything_it_started(stack: Stack) -> None:
    pids = [
        int(p) for p in stack.ctl("pid", "all", check=False).split() if p.isdigit() and p != "0"
    ]
    assert len(pids) >= 6
    stack.down()
    _, alive = psutil.wait_procs(
        [psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=30
    )
    assert alive == []
    assert not stack.running()
