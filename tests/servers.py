"""Run a server as a background process: wait for its health check, stop its whole group.

Servers such as `mlflow server` spawn several processes; each is started in a new session
so that `stop()` can signal the whole process group. Output goes to a log file that is
kept, and quoted when the server fails to come up.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import boto3

from common import health
from common.localpg import LocalPostgres
from tests.processes import kill_group, run_group

VENV_BIN = Path(sys.executable).parent
MLFLOW_BUCKET = "mlflow-artifacts"
PREFECT_STARTUP_TIMEOUT = 180
"""Seconds `prefect_test_harness` may take to start its server: it migrates a new SQLite
database first, which takes over a minute when the suite's other workers load the cores."""
STARTUP_TIMEOUT = 300
"""Seconds a server the tests start may take to answer healthy: a predictor's workers import
MLflow, scikit-learn and ONNX and load their model, over two minutes when the suite's other
workers load the cores (a healthy server returns at once; this only bounds a broken one)."""
DVC_BUCKET = "dvc-store"
FAKE_AWS_CREDS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _runs_project_code(cmd: Sequence[str]) -> bool:
    """Whether a server runs this project's code: not moto, Evidently's UI, Prefect's server
    or a plain MLflow server (one with `--app-name mlops-auth` runs our auth app)."""
    words = [Path(part).name for part in cmd]
    if words and words[0] in ("moto_server", "evidently"):
        return False
    tool = "server" in words and ("mlflow" in words or "prefect" in words)
    return not tool or "--app-name" in words


def clean_env(**extra: str) -> dict[str, str]:
    """This process's env without MLflow/AWS settings, the venv first on PATH, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    return env | extra


@dataclass(frozen=True)
class S3Endpoint:
    """An S3 endpoint and the credentials it takes."""

    url: str
    creds: dict[str, str]

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.creds["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.creds["AWS_SECRET_ACCESS_KEY"],
            region_name=self.creds.get("AWS_DEFAULT_REGION", "us-east-1"),
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in `bucket` under `prefix`."""
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@dataclass(frozen=True)
class HttpServer:
    """A running HTTP server: where it answers and where its log is."""

    url: str
    log_path: Path


_HANDED_OUT: set[int] = set()
_PORTS = random.Random(os.getpid())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and outside the kernel's ephemeral range.

    Port 0 would hand out an ephemeral port, which the kernel may give to any outgoing
    connection before the server binds it (seen: a Prefect server's port taken by a client
    socket in between). Ports 20000-32767 are never handed out that way; each port is
    given once per test process.
    """
    for _ in range(1000):
        port = _PORTS.randrange(20000, 32768)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free TCP port in 20000-32767 on 127.0.0.1")


def http_ok(url: str, timeout: float = 2) -> Callable[[], bool]:
    """A health check: GET `url` answers 2xx."""
    return lambda: health.http_ok(url, timeout)


def run_ok(cmd: Sequence[str], *, cwd: Path, env: Mapping[str, str], timeout: float = 120) -> str:
    """Run a command to completion; its stdout, or an assertion error quoting both streams."""
    proc = run_group(cmd, cwd=cwd, env=env, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@contextmanager
def prefect_server(home: Path, **extra: str) -> Iterator[dict[str, str]]:
    """`prefect server start` on a free port (SQLite in PREFECT_HOME=`home`), for as long as
    the block runs; yields the env its clients use (`clean_env` plus `extra`, without the
    settings of the process that runs the tests)."""
    port = free_port()
    env = clean_env(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        **extra,
    )
    for name in ("MLOPS_HOME", "PREFECT__FLOW_RUN_ID", "DATABASE_URL"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    server = Server(
        "prefect server",
        [*cmd, "--port", str(port)],
        log_path=home / "server.log",
        healthy=http_ok(f"http://127.0.0.1:{port}/api/health"),
        env=env,
    )
    with server.start(timeout=PREFECT_STARTUP_TIMEOUT):
        yield env


def prefect_cli(env: Mapping[str, str], cwd: Path, *args: str, timeout: float = 600) -> str:
    """`prefect <args>` against the server in `env` (see `prefect_server`); its stdout."""
    return run_ok([sys.executable, "-m", "prefect", *args], cwd=cwd, env=env, timeout=timeout)


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ServerError(RuntimeError):
    """A server exited or did not become healthy in time."""


class Server:
    """One server process group with a log file; a context manager that always stops it."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        log_path: Path,
        healthy: Callable[[], bool],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log_path = log_path
        self.healthy = healthy
        self.env = dict(env) if env is not None else None
        if not _runs_project_code(self.cmd):  # coverage's tracing would slow it, measuring nothing
            base = os.environ if self.env is None else self.env
            self.env = {k: v for k, v in base.items() if k != "COVERAGE_PROCESS_CONFIG"}
        self.cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = STARTUP_TIMEOUT) -> Self:
        """Start the process and wait until `healthy()`; on failure stop it and quote its log."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
        )
        try:
            self._wait_healthy(timeout)
        except BaseException:  # also Ctrl-C while waiting: never leave the group behind
            self.stop()
            raise
        return self

    def _wait_healthy(self, timeout: float) -> None:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            code = self._proc.poll() if self._proc is not None else -1
            if code is not None:
                raise ServerError(self._failure(f"exited with {code}"))
            if self.healthy():
                return
            time.sleep(0.2)
        raise ServerError(self._failure(f"not healthy after {timeout:.0f} s"))

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM the process group, SIGKILL what is left after `timeout`. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            pgid = proc.pid  # start_new_session: the leader's pid is the group id
            kill_group(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
            # Children may outlive the leader; whatever is left of the group goes now.
            deadline = time.monotonic() + timeout
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            kill_group(pgid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _failure(self, what: str) -> str:
        return (
            f"{self.name} {what}: {' '.join(self.cmd)}\n"
            f"--- {self.log_path} (last lines) ---\n{log_tail(self.log_path)}"
        )

    def __enter__(self) -> Self:
        return self.start() if self._proc is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process is still in group `pgid`."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After "(comm)": state, ppid, pgrp, ...
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


@contextmanager
def throwaway_cluster(name: str, database: str) -> Iterator[LocalPostgres]:
    """A PostgreSQL cluster on a free port with one database, destroyed afterwards."""
    # Not under pytest's basetemp: that is 0700 root, and the cluster runs as `postgres`.
    base = Path(tempfile.mkdtemp(prefix=f"mlops-it-{name}-"))
    pg = LocalPostgres(base, free_port(), settings={"fsync": "off"})
    try:
        pg.start()
        pg.create_database(database)
        yield pg
    finally:
        pg.destroy()
