"""`make up` / `make down`: the compose topology as local processes, under supervisord.

Same services and the same environment variables as infra/docker/compose.yml: PostgreSQL
(installed binaries), an S3 endpoint (moto's server, where MinIO is absent), `mlflow
server`, `prefect server` + a worker with the deployments of the project's prefect.yaml
applied, `evidently ui` over the monitoring workspace, two job workers (`python -m
services.worker`, compose's `worker` replicas) and the predictor once a champion exists.
`up` waits on each service's health endpoint; each logs to MLOPS_HOME/stack/logs/<name>.log;
`down` stops everything supervisord started, nothing else.

Locked as compose is: every server listens on 127.0.0.1; PostgreSQL wants a password over
TCP (scram) and each service logs in as its own role (infra/docker/initdb/roles.psql);
MLflow runs its basic-auth app with a user per service (common.registry.access); Prefect
wants its auth string and a CSRF token; the Evidently UI wants its secret for writes. The
secrets are generated once into secrets.env (0600) beside the stack's data and reach each
program through its environment, never its command line. stack.env (0600) is the
operator's: MLflow's admin, Prefect's auth string, the database's owner.

One stack per environment (MLOPS_ENV, or `make up ENV=staging`): dev's in MLOPS_HOME/stack
on the ports below, staging's in MLOPS_HOME/stack-staging on each port + 100, prod's in
MLOPS_HOME/stack-prod on each port + 200, side by side on one machine. Each has its own
PostgreSQL cluster, buckets (`mlflow-staging`, ...), MLflow, Prefect server, work pool
(`local-process-staging`) with prefect.yaml's deployments, workers and predictor, and its
services run with MLOPS_ENV set, so they serve and register that environment's model.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import secrets
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3

from common.errors import UserError, run_cli
from common.health import http_ok
from common.localpg import LocalPostgres
from common.registry.access import FLOWS, PREDICTOR, auth_config, ensure_service_users
from common.settings import ENVIRONMENTS, Environment, get_settings
from common.store import migrate

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DATABASES = ("mlflow", "mlflow_auth", "prefect", "predictions")
BUCKETS = ("mlflow", "dvc", "evidently")
# moto checks no credentials: any pair works, and every client here uses this one.
DEV_CREDS = {"AWS_ACCESS_KEY_ID": "stack-local", "AWS_SECRET_ACCESS_KEY": "stack-local-secret"}
ROLES_SQL = ROOT / "infra/docker/initdb/roles.psql"
PG_ROLES = {
    "owner": ("mlops_owner", "POSTGRES_OWNER_PASSWORD"),
    "predictor": ("mlops_predictor", "POSTGRES_PREDICTOR_PASSWORD"),
    "flows": ("mlops_flows", "POSTGRES_FLOWS_PASSWORD"),
    "grafana": ("mlops_grafana", "POSTGRES_GRAFANA_PASSWORD"),
    "mlflow": ("mlflow", "POSTGRES_MLFLOW_PASSWORD"),
    "prefect": ("prefect", "POSTGRES_PREFECT_PASSWORD"),
    "worker": ("mlops_worker", "POSTGRES_WORKER_PASSWORD"),
}
"""Each service's PostgreSQL role (roles.psql creates them) and its password's variable."""
MLFLOW_ADMIN = "admin"
SECRETS = (
    "POSTGRES_PASSWORD",  # the cluster's superuser: this script and scripts/ops.py only
    *(env for _, env in PG_ROLES.values()),
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
    FLOWS.password_env,
    PREDICTOR.password_env,
    "PREFECT_API_AUTH_STRING",
    "EVIDENTLY_SECRET",
    "JOB_CALLBACK_SECRET",
)
"""What `up` generates once into secrets.env; the names are compose's .env names."""


def _new_secret(name: str) -> str:
    token = secrets.token_urlsafe(24)  # URL-safe: goes into connection URLs as it is
    return f"prefect:{token}" if name == "PREFECT_API_AUTH_STRING" else token  # user:password


def _write_private(path: Path, text: str) -> None:
    """Write `text` to a file only its owner may read (0600 before the first byte)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def load_secrets(home: Path) -> dict[str, str]:
    """The stack's secrets.env (KEY=value lines), or nothing before the first `up`."""
    try:
        lines = (home / "secrets.env").read_text().splitlines()
    except FileNotFoundError:
        return {}
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


@dataclass(frozen=True)
class Ports:
    postgres: int = 5432
    s3: int = 9000
    mlflow: int = 5000
    prefect: int = 4200
    predictor: int = 3000
    evidently: int = 8000
    worker: int = 8080  # the worker's health endpoint (`prefect worker start --with-healthcheck`)
    jobs1: int = 9101  # the job workers' metrics (`python -m services.worker --metrics-port`)
    jobs2: int = 9102

    @classmethod
    def of(cls, env: Environment) -> Ports:
        """An environment's default ports: dev's above, each + 100 in staging, + 200 in prod."""
        shift = ENV_PORT_SHIFT[env]
        return cls(**{name: port + shift for name, port in cls().__dict__.items()})


ENV_PORT_SHIFT: dict[str, int] = {"dev": 0, "staging": 100, "prod": 200}
"""How far an environment's stack sits from dev's ports (no two environments' ports meet)."""


def stack_home(home: Path, env: Environment) -> Path:
    """Where an environment's stack lives under MLOPS_HOME: `stack` for dev, `stack-<env>`."""
    return home / ("stack" if env == "dev" else f"stack-{env}")


def env_name(name: str, env: Environment, sep: str = "-") -> str:
    """A per-environment name: `name` itself in dev (as before environments), else suffixed."""
    return name if env == "dev" else f"{name}{sep}{env}"


JOB_WORKERS = ("jobs-worker-1", "jobs-worker-2")
"""The job workers `up` starts (compose: the `worker` service's two replicas)."""
_STOP_WAIT = {"prefect-worker": 5, **dict.fromkeys(JOB_WORKERS, 40)}
"""Seconds supervisord waits after SIGTERM before SIGKILL, where not the default 20."""


class Stack:
    """One stack's files (config, logs, data) under `home`, and its supervisord.

    `project` is the checkout whose prefect.yaml is deployed and where flow runs execute
    (MLOPS_PROJECT_DIR); the servers themselves run from this repository.
    """

    def __init__(
        self, home: Path, ports: Ports, project: Path = ROOT, env: Environment = "dev"
    ) -> None:
        self.home = home.resolve()
        self.ports = ports
        self.project = project.resolve()
        self.env_name: Environment = env
        self.pool = env_name("local-process", env)
        """The Prefect work pool its deployments target and its worker serves."""
        self.conf = self.home / "supervisord.conf"
        self.logs = self.home / "logs"
        self.secrets = load_secrets(self.home)
        self.pg = self._postgres()

    def _postgres(self) -> LocalPostgres:
        """The cluster, its superuser's password from secrets.env (host logins: scram)."""
        password = self.secrets.get("POSTGRES_PASSWORD")
        return LocalPostgres(self.home / "postgres", self.ports.postgres, password=password)

    def ensure_secrets(self) -> None:
        """Generate what secrets.env lacks (all of it on the first `up`), keep the rest."""
        if (self.pg.data_dir / "PG_VERSION").exists() and not (self.home / "secrets.env").exists():
            raise UserError(
                f"the stack in {self.home} was made before its services had credentials (its "
                f"PostgreSQL trusts every connection): `make down`, move {self.home} away, "
                "then `make up` for a new one (scripts/ops.py backup/restore carries data over)"
            )
        missing = [name for name in SECRETS if not self.secrets.get(name)]
        if missing:
            self.secrets |= {name: _new_secret(name) for name in missing}
            self.home.mkdir(parents=True, exist_ok=True)
            _write_private(
                self.home / "secrets.env",
                "# Generated by `make up`; each service gets its own through its environment.\n"
                + "".join(f"{k}={v}\n" for k, v in sorted(self.secrets.items())),
            )
        self.pg = self._postgres()

    def db_url(self, role: str, database: str, driver: str | None = None) -> str:
        """`database` as the service role `role` (a PG_ROLES key), password included."""
        name, env = PG_ROLES[role]
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{name}:{self.secrets[env]}@127.0.0.1:{self.ports.postgres}/{database}"

    @classmethod
    def load(cls, home: Path) -> Stack:
        """The stack `up` started in `home` (its ports, project and environment are kept in
        stack.json; one from before environments is dev's)."""
        try:
            saved = json.loads((home / "stack.json").read_text())
        except OSError as exc:
            raise UserError(f"no stack in {home} (start one with `make up`)") from exc
        return cls(home, Ports(**saved["ports"]), Path(saved["project"]), saved.get("env", "dev"))

    def bucket(self, name: str) -> str:
        """This environment's bucket `name` (BUCKETS): `mlflow` in dev, `mlflow-staging`, ..."""
        return env_name(name, self.env_name)

    # -- the environment compose gives its services -------------------------------------

    def _common_env(self) -> dict[str, str]:
        """What every client of the stack gets: where things are, no credentials."""
        return {
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{self.ports.mlflow}",
            "MLOPS_ENV": self.env_name,
            "MLOPS_HOME": str(self.home / "state"),
            "BENTOML_HOME": str(self.home / "state/bentoml"),
            "OMP_NUM_THREADS": "1",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }

    def _flows_env(self) -> dict[str, str]:
        """Where the flows' servers are: S3, Prefect, the Evidently UI (credentials apart)."""
        p = self.ports
        return {
            **self._common_env(),
            **DEV_CREDS,
            "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{p.s3}",
            "PREFECT_API_URL": f"http://127.0.0.1:{p.prefect}/api",
            "PREFECT_WORK_POOL": self.pool,
            "EVIDENTLY_WORKSPACE": f"http://127.0.0.1:{p.evidently}",
        }

    def env(self) -> dict[str, str]:
        """The operator's environment (`source stack.env`): every URL, admin credentials."""
        return {
            **self._flows_env(),
            "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN,
            "MLFLOW_TRACKING_PASSWORD": self.secrets["MLFLOW_AUTH_ADMIN_PASSWORD"],
            "PREFECT_API_AUTH_STRING": self.secrets["PREFECT_API_AUTH_STRING"],
            "EVIDENTLY_SECRET": self.secrets["EVIDENTLY_SECRET"],
            "DATABASE_URL": self.db_url("owner", "predictions"),
        }

    def worker_env(self) -> dict[str, str]:
        """The Prefect worker's, which its flow runs inherit: the `flows` identities."""
        return {
            **self._flows_env(),
            "MLFLOW_TRACKING_USERNAME": FLOWS.name,
            "MLFLOW_TRACKING_PASSWORD": self.secrets[FLOWS.password_env],
            "PREFECT_API_AUTH_STRING": self.secrets["PREFECT_API_AUTH_STRING"],
            "EVIDENTLY_SECRET": self.secrets["EVIDENTLY_SECRET"],
            "DATABASE_URL": self.db_url("flows", "predictions"),
        }

    def predictor_env(self) -> dict[str, str]:
        """The predictor's: read-only MLflow user, its own role; no S3 key, no Prefect."""
        return {
            **self._common_env(),
            "MLFLOW_TRACKING_USERNAME": PREDICTOR.name,
            "MLFLOW_TRACKING_PASSWORD": self.secrets[PREDICTOR.password_env],
            "DATABASE_URL": self.db_url("predictor", "predictions"),
        }

    def jobs_worker_env(self) -> dict[str, str]:
        """The job workers': their own role, the read-only MLflow user, the callback secret."""
        return {
            **self._common_env(),
            "MLFLOW_TRACKING_USERNAME": PREDICTOR.name,
            "MLFLOW_TRACKING_PASSWORD": self.secrets[PREDICTOR.password_env],
            "DATABASE_URL": self.db_url("worker", "predictions"),
            "JOB_CALLBACK_SECRET": self.secrets["JOB_CALLBACK_SECRET"],
            # Models through MLflow's proxy, not presigned S3 URLs (compose's worker too).
            "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
        }

    def _job_metrics_ports(self) -> dict[str, int]:
        return dict(zip(JOB_WORKERS, (self.ports.jobs1, self.ports.jobs2), strict=True))

    def _programs(self) -> dict[str, tuple[list[str], dict[str, str], bool]]:
        p, pg, secret = self.ports, self.pg, self.secrets
        mlflow_hosts = f"127.0.0.1:{p.mlflow},localhost:{p.mlflow}"
        jobs_workers: dict[str, tuple[list[str], dict[str, str], bool]] = {
            name: (
                [str(BIN / "python"), "-m", "services.worker", "--metrics-port", str(port)],
                self.jobs_worker_env(),
                False,
            )
            for name, port in self._job_metrics_ports().items()
        }
        return {
            "postgres": (
                [
                    str(pg.bin_dir / "postgres"),
                    "-D",
                    str(pg.data_dir),
                    "-p",
                    str(p.postgres),
                    "-k",
                    str(pg.socket_dir),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "unix_socket_permissions=0700",  # local logins are trusted: owner only
                ],
                {},
                True,
            ),
            "s3": ([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(p.s3)], {}, True),
            "mlflow": (
                [
                    str(BIN / "mlflow"),
                    "server",
                    "--app-name",
                    "mlops-auth",
                    "--backend-store-uri",  # no password: libpq takes PGPASSWORD
                    f"postgresql+psycopg://mlflow@127.0.0.1:{p.postgres}/mlflow",
                    "--artifacts-destination",
                    f"s3://{self.bucket('mlflow')}/",
                    "--serve-artifacts",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(p.mlflow),
                    "--workers",
                    "1",
                    "--allowed-hosts",
                    mlflow_hosts,
                ],
                {
                    **DEV_CREDS,
                    "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{p.s3}",
                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                    "PGPASSWORD": secret["POSTGRES_MLFLOW_PASSWORD"],
                    "MLFLOW_AUTH_CONFIG_PATH": str(self.home / "mlflow/basic_auth.ini"),
                    "MLFLOW_AUTH_ADMIN_USERNAME": MLFLOW_ADMIN,
                    "MLFLOW_AUTH_ADMIN_PASSWORD": secret["MLFLOW_AUTH_ADMIN_PASSWORD"],
                    "MLFLOW_FLASK_SERVER_SECRET_KEY": secret["MLFLOW_FLASK_SERVER_SECRET_KEY"],
                },
                False,
            ),
            "prefect-server": (
                [
                    str(BIN / "prefect"),
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(p.prefect),
                ],
                {
                    "PREFECT_HOME": str(self.home / "prefect"),
                    "PREFECT_API_DATABASE_CONNECTION_URL": self.db_url(
                        "prefect", "prefect", driver="asyncpg"
                    ),
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_SERVER_API_AUTH_STRING": secret["PREFECT_API_AUTH_STRING"],
                    "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true",
                },
                False,
            ),
            "prefect-worker": (
                [
                    str(BIN / "prefect"),
                    "worker",
                    "start",
                    "--pool",
                    self.pool,
                    "--type",
                    "process",
                    "--with-healthcheck",
                ],
                {
                    **self.worker_env(),
                    # dvc.yaml's stages call `python`: this environment's, however up was run.
                    "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                    "PREFECT_HOME": str(self.home / "prefect"),
                    "MLOPS_PROJECT_DIR": str(self.project),
                    "PREFECT_WORKER_WEBSERVER_PORT": str(p.worker),
                    "PREFECT_WORKER_QUERY_SECONDS": "2",
                },
                False,
            ),
            "evidently": (
                [
                    str(BIN / "evidently"),
                    "ui",
                    "--workspace",
                    str(self.home / "evidently"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(p.evidently),
                ],
                {"DO_NOT_TRACK": "1", "EVIDENTLY_SECRET": secret["EVIDENTLY_SECRET"]},
                True,
            ),
            "predictor": (
                [
                    str(BIN / "python"),
                    "-m",
                    "bentoml",
                    "serve",
                    "services.predictor.service:Predictor",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(p.predictor),
                ],
                self.predictor_env(),
                False,
            ),
            **jobs_workers,
        }

    def write_conf(self) -> None:
        sock = self.home / "supervisor.sock"
        lines = [
            "[unix_http_server]",
            f"file={sock}",
            "",
            "[supervisord]",
            f"logfile={self.home / 'supervisord.log'}",
            f"pidfile={self.home / 'supervisord.pid'}",
            f"childlogdir={self.logs}",
            "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "",
            "[supervisorctl]",
            f"serverurl=unix://{sock}",
            "",
        ]
        for name, (cmd, env, autostart) in self._programs().items():
            lines += [
                f"[program:{name}]",
                f"command={shlex.join(cmd)}",
                f"directory={self.project if name == 'prefect-worker' else ROOT}",
                f"autostart={'true' if autostart else 'false'}",
                "autorestart=unexpected",
                "startsecs=2",
                "stopasgroup=true",
                "killasgroup=true",
                # The worker ignores its first signal; its flow runs are in its group. A job
                # worker finishes the batch in hand (JOB_VISIBILITY_TIMEOUT at most).
                f"stopwaitsecs={_STOP_WAIT.get(name, 20)}",
                "redirect_stderr=true",
                f"stdout_logfile={self.logs / f'{name}.log'}",
            ]
            if name == "postgres":
                lines.append("stopsignal=INT")
                if os.geteuid() == 0:
                    lines.append("user=postgres")
            if env:
                pairs = ",".join(f'{k}="{v}"' for k, v in env.items())
                lines.append(f"environment={pairs}")
            lines.append("")
        _write_private(self.conf, "\n".join(lines))  # it holds every program's secrets

    def ctl(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(
            [str(BIN / "supervisorctl"), "-c", str(self.conf), *args],
            capture_output=True,
            text=True,
            check=False,
        )
        if check and proc.returncode != 0:
            raise UserError(f"supervisorctl {' '.join(args)} failed: {proc.stdout}{proc.stderr}")
        return proc.stdout

    def states(self) -> dict[str, str]:
        """Each program's supervisord state (RUNNING, STOPPED, FATAL, ...)."""
        return {
            fields[0]: fields[1]
            for line in self.ctl("status", check=False).splitlines()
            if len(fields := line.split()) > 1
        }

    def start(self, *names: str) -> None:
        """Start programs; one already running is fine (`make up` twice is harmless)."""
        out = self.ctl("start", *names, check=False)
        failed = [
            line for line in out.splitlines() if "ERROR" in line and "already started" not in line
        ]
        if failed:
            raise UserError(f"could not start: {'; '.join(failed)} (logs in {self.logs})")

    def running(self) -> bool:
        """Whether this stack's supervisord is alive."""
        try:
            pid = int((self.home / "supervisord.pid").read_text().strip())
        except (OSError, ValueError):
            return False
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True

    # -- up / down --------------------------------------------------------------------------

    def up(self, timeout: float = 180) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        running = self.running()
        if running:
            saved = Stack.load(self.home)
            if (saved.ports, saved.project, saved.env_name) != (
                self.ports,
                self.project,
                self.env_name,
            ):
                raise UserError(f"a stack with other ports runs in {self.home}: `make down` first")
        else:
            taken = [f"{n} :{p}" for n, p in self.ports.__dict__.items() if not _port_free(p)]
            if taken:
                raise UserError(
                    f"port in use: {', '.join(taken)}; stop what holds it or pick another "
                    "(e.g. --mlflow-port 5001)"
                )
        self.ensure_secrets()
        (self.home / "stack.json").write_text(
            json.dumps(
                {"ports": self.ports.__dict__, "project": str(self.project), "env": self.env_name},
                indent=1,
            )
        )
        _write_private(
            self.home / "stack.env",
            "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.env().items()),
        )
        (self.home / "mlflow").mkdir(exist_ok=True)
        (self.home / "mlflow/basic_auth.ini").write_text(
            auth_config(f"postgresql+psycopg://mlflow@127.0.0.1:{self.ports.postgres}/mlflow_auth")
        )
        self.pg.init()
        self.write_conf()
        if not running:
            subprocess.run([str(BIN / "supervisord"), "-c", str(self.conf)], check=True)
        self._wait("postgres", lambda: _pg_ready(self.pg), timeout)
        self.create_roles()
        migrate(self.db_url("owner", "predictions"))  # as its owner, before any service
        self.wait_healthy("s3", timeout=timeout)
        s3 = self.s3()
        existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        for bucket in {self.bucket(name) for name in BUCKETS} - existing:
            s3.create_bucket(Bucket=bucket)
        self.start("mlflow", "prefect-server")
        self.wait_healthy("mlflow", "prefect-server", "evidently", timeout=timeout)
        ensure_service_users(
            self.env()["MLFLOW_TRACKING_URI"],
            (MLFLOW_ADMIN, self.secrets["MLFLOW_AUTH_ADMIN_PASSWORD"]),
            self.secrets,
        )
        if not (self.project / "prefect.yaml").exists():
            raise UserError(f"{self.project / 'prefect.yaml'} not found: nothing to deploy")
        self._deploy()
        self.start("prefect-worker", *JOB_WORKERS)
        self.wait_healthy("prefect-worker", *JOB_WORKERS, timeout=timeout)
        self.serve_if_champion(timeout)

    def create_roles(self) -> None:
        """Compose's initdb roles.psql on this cluster: each service's role and database.

        Passwords reach psql through its environment (\\getenv), never its command line.
        """
        env = {
            **os.environ,
            "PGPASSWORD": self.secrets["POSTGRES_PASSWORD"],
            **{env: self.secrets[env] for _, env in PG_ROLES.values()},
        }
        psql = [str(self.pg.bin_dir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1"]
        where = ["-h", "127.0.0.1", "-p", str(self.ports.postgres), "-U", self.pg.user]
        proc = subprocess.run(
            [*psql, *where, "-d", "postgres", "-f", str(ROLES_SQL)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise UserError(f"{ROLES_SQL.name} failed: {proc.stderr.strip()}")

    def _deploy(self) -> None:
        env = {
            **os.environ,
            **self.env(),
            "PREFECT_HOME": str(self.home / "prefect"),
            "MLOPS_PROJECT_DIR": str(self.project),
        }
        prefect = str(BIN / "prefect")
        subprocess.run(
            [prefect, "work-pool", "create", self.pool, "--type", "process", "--overwrite"],
            cwd=self.project,
            env=env,
            check=True,
            capture_output=True,
        )
        for cmd, what in (
            ([prefect, "--no-prompt", "deploy", "--all"], "prefect deploy --all failed"),
            ([str(BIN / "python"), "-m", "common.flow_alerts"], "the flow-run alert failed"),
        ):
            proc = subprocess.run(
                cmd, cwd=self.project, env=env, capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                raise UserError(f"{what}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")

    def serve_if_champion(self, timeout: float) -> bool:
        """Start the predictor when the registry has a champion; say how to get one otherwise."""
        env = {**os.environ, **self.predictor_env()}
        bundle = subprocess.run(
            [str(BIN / "python"), "-m", "services.predictor.package"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if bundle.returncode != 0:
            print(
                "predictor: not started, no champion yet. Register one against this stack:\n"
                f"  source {self.home / 'stack.env'}\n"
                "  prefect deployment run pipeline/pipeline --watch   # the worker trains\n"
                "  make up                                      # again: the predictor starts"
            )
            return False
        self.start("predictor")
        self.wait_healthy("predictor", timeout=timeout)
        return True

    def _wait(self, name: str, ready: Callable[[], bool], timeout: float) -> None:
        """Until `ready`; fail at once when supervisord gave the program up, with its log."""
        deadline = time.monotonic() + timeout
        while not ready():
            state = self.states().get(name, "")
            gave_up = state in {"FATAL", "EXITED"}
            if gave_up or time.monotonic() > deadline:
                log = self.logs / f"{name}.log"
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                raise UserError(
                    f"{name} did not become healthy ({state if gave_up else 'timeout'}); "
                    f"the end of {log}:\n{tail}"
                )
            time.sleep(0.5)

    def health_urls(self) -> dict[str, str]:
        """The endpoint each HTTP service is waited on (compose's healthchecks use the same)."""
        p = self.ports
        return {
            "s3": f"http://127.0.0.1:{p.s3}/moto-api/",
            "mlflow": f"http://127.0.0.1:{p.mlflow}/health",
            "prefect-server": f"http://127.0.0.1:{p.prefect}/api/health",
            "evidently": f"http://127.0.0.1:{p.evidently}/api/projects",
            "prefect-worker": f"http://127.0.0.1:{p.worker}/health",
            "predictor": f"http://127.0.0.1:{p.predictor}/readyz",
            **{
                name: f"http://127.0.0.1:{port}/metrics"
                for name, port in self._job_metrics_ports().items()
            },
        }

    def wait_healthy(self, *names: str, timeout: float = 180) -> None:
        urls = self.health_urls()
        for name in names:
            self._wait(name, functools.partial(http_ok, urls[name]), timeout)

    def down(self) -> None:
        if not self.running():
            print("stack: not running")
            return
        self.ctl("shutdown", check=False)
        deadline = time.monotonic() + 60
        while (self.home / "supervisord.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.2)

    def s3(self) -> Any:
        """A boto3 S3 client of the stack's endpoint."""
        return boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{self.ports.s3}",
            aws_access_key_id=DEV_CREDS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=DEV_CREDS["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )

    def urls(self) -> list[tuple[str, str]]:
        p = self.ports
        return [
            ("MLflow UI + registry", f"http://127.0.0.1:{p.mlflow}"),
            ("Prefect UI", f"http://127.0.0.1:{p.prefect}"),
            ("Evidently UI", f"http://127.0.0.1:{p.evidently}"),
            ("Predictor (Swagger UI)", f"http://127.0.0.1:{p.predictor}"),
            ("S3 endpoint (moto)", f"http://127.0.0.1:{p.s3}"),
            ("Job workers' metrics", f"http://127.0.0.1:{p.jobs1}/metrics, :{p.jobs2}/metrics"),
            ("PostgreSQL", f"127.0.0.1:{p.postgres} (roles and passwords: secrets.env)"),
        ]


def _pg_ready(pg: LocalPostgres) -> bool:
    try:
        with pg.connect():
            return True
    except Exception:  # any connection failure: not ready yet
        return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as servers do: TIME_WAIT is free
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    for field, default in Ports().__dict__.items():
        parser.add_argument(
            f"--{field}-port", type=int, help=f"default {default}, or the last `up`'s"
        )
    parser.add_argument("--project", type=Path, help="checkout to deploy and run flows in")
    parser.add_argument(
        "--env", choices=ENVIRONMENTS, help="the environment's stack (default: MLOPS_ENV, dev)"
    )
    args = parser.parse_args()
    settings = get_settings()
    env: Environment = args.env or settings.mlops_env
    home = stack_home(settings.mlops_home, env)
    last = (
        Stack.load(home) if (home / "stack.json").exists() else Stack(home, Ports.of(env), env=env)
    )
    given = {f: v for f in Ports().__dict__ if (v := getattr(args, f"{f}_port")) is not None}
    ports = Ports(**{**last.ports.__dict__, **given})
    stack = Stack(home, ports, args.project or last.project, env)
    if args.command == "up":
        stack.up()
        for name, url in stack.urls():
            print(f"{name:24} {url}")
        print(f"environment: {env} (work pool {stack.pool}, model {settings.model_name_in(env)})")
        print(f"logs: {stack.logs}/   env for clients: source {stack.home / 'stack.env'}")
    elif args.command == "down":
        stack.down()
    else:
        print(stack.ctl("status", check=False), end="")


if __name__ == "__main__":
    run_cli(main)
