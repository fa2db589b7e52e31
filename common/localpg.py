"""A throwaway PostgreSQL cluster run from the installed server binaries.

    with LocalPostgres(Path("/tmp/pg"), port=5433) as pg:
        pg.create_database("mlflow")
        url = pg.url("mlflow", driver="psycopg")

The cluster lives in one directory (data/, sock/, postgres.log). As root, initdb and
postgres run as the `postgres` OS user, which then owns that directory. Stopping and
starting again reuses the same data, so a caller can take the server away mid-traffic.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self

import psycopg
from psycopg import sql

from common.errors import UserError
from common.settings import Environment, Settings, get_settings
from common.store import migrate, roles

PG_OS_USER = "postgres"
INSTALL_HINT = (
    "install the PostgreSQL server (Debian/Ubuntu: apt-get install postgresql; "
    "macOS: brew install postgresql) or set PG_BIN to the directory holding initdb and postgres"
)
StopMode = Literal["smart", "fast", "immediate"]
_STOP_SIGNALS: dict[str, signal.Signals] = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}


class PostgresError(RuntimeError):
    """The cluster could not be found, initialised, started or stopped."""


def _has_server(bin_dir: Path) -> bool:
    return (bin_dir / "initdb").is_file() and (bin_dir / "postgres").is_file()


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path.parent.name)) or (0,)


def find_bin_dir(pg_bin: Path | None = None) -> Path:
    """PG_BIN (settings), else `pg_config --bindir`, else the highest /usr/lib/postgresql/*/bin."""
    if pg_bin is not None:
        if not _has_server(pg_bin):
            raise PostgresError(f"PG_BIN={pg_bin} holds no initdb/postgres; {INSTALL_HINT}.")
        return pg_bin
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True
            ).stdout.strip()
            if out and _has_server(Path(out)):
                return Path(out)
    found = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if _has_server(p)]
    if found:
        return max(found, key=_version_key)
    raise PostgresError(f"no PostgreSQL server binaries found; {INSTALL_HINT}.")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class LocalPostgres:
    """One cluster in `base_dir`, served on 127.0.0.1:`port` and a socket in base_dir/sock."""

    def __init__(
        self,
        base_dir: Path,
        port: int,
        *,
        user: str = "postgres",
        password: str | None = None,
        bin_dir: Path | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.base_dir = base_dir.resolve()
        self.port = port
        self.user = user
        self.password = password
        self.bin_dir = bin_dir or find_bin_dir(get_settings().pg_bin)
        self.settings = dict(settings or {})
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "sock"
        self.log_path = self.base_dir / "postgres.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._os_user = pwd.getpwnam(PG_OS_USER) if os.geteuid() == 0 else None

    # -- lifecycle ---------------------------------------------------------------------

    def init(self) -> None:
        """Create the cluster unless base_dir already holds one."""
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if (self.data_dir / "PG_VERSION").exists():
            self._chown()
            return
        self._chown()
        cmd = [
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            self.user,
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--auth-local=trust",
        ]
        pwfile = self.base_dir / "pwfile"
        if self.password:
            pwfile.write_text(self.password)
            pwfile.chmod(0o600)
            self._chown(pwfile)
            cmd += ["--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        else:
            cmd += ["--auth-host=trust"]
        try:
            proc = subprocess.run(
                cmd, check=False, capture_output=True, text=True, **self._as_pg_user()
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise PostgresError(f"initdb failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")

    def start(self, timeout: float = 30) -> None:
        """Start the server (initialising first if needed) and wait until it accepts queries."""
        if self.running:
            return
        self.init()
        cmd = [
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-k",
            str(self.socket_dir),
            "-c",
            "listen_addresses=127.0.0.1",
        ]
        for key, value in self.settings.items():
            cmd += ["-c", f"{key}={value}"]
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **self._as_pg_user(),
        )
        try:
            self._wait_ready(timeout)
        except BaseException:  # also Ctrl-C while waiting: never leave a postmaster behind
            self.stop(mode="immediate")
            raise

    def stop(self, mode: StopMode = "fast", timeout: float = 30) -> None:
        """Shut the server down (fast: abort sessions, clean checkpoint); SIGKILL if it hangs."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, _STOP_SIGNALS[mode])
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, timeout: float = 30) -> None:
        self.stop()
        self.start(timeout)

    def destroy(self) -> None:
        """Stop the server and delete base_dir with all its data."""
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- databases ---------------------------------------------------------------------

    def url(self, database: str = "postgres", driver: str | None = None) -> str:
        """An SQLAlchemy-style URL; `driver="psycopg"` gives postgresql+psycopg://..."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        auth = f"{self.user}:{self.password}" if self.password else self.user
        return f"{scheme}://{auth}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> psycopg.Connection[Any]:
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=database,
            autocommit=True,
            connect_timeout=10,
        )

    def create_database(self, name: str) -> None:
        """Create database `name` unless it exists."""
        with self.connect() as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
                return
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    # -- internals ---------------------------------------------------------------------

    def _as_pg_user(self) -> dict[str, Any]:
        if self._os_user is None:
            return {}
        return {
            "user": self._os_user.pw_uid,
            "group": self._os_user.pw_gid,
            "extra_groups": [],
            "env": {**os.environ, "HOME": self._os_user.pw_dir, "USER": PG_OS_USER},
        }

    def _chown(self, path: Path | None = None) -> None:
        """As root, hand base_dir (or one path) to the postgres user; it must reach it, too."""
        if self._os_user is None:
            return
        uid, gid = self._os_user.pw_uid, self._os_user.pw_gid
        if path is not None:
            os.chown(path, uid, gid)
            return
        for parent in reversed(self.base_dir.parents):
            st = parent.stat()
            if not (st.st_mode & stat.S_IXOTH or st.st_uid == uid):
                raise PostgresError(
                    f"the {PG_OS_USER} user cannot reach {self.base_dir}: {parent} is not "
                    "traversable by others; put the cluster under e.g. tempfile.mkdtemp()."
                )
        for root, dirs, files in os.walk(self.base_dir):
            for name in [root, *(os.path.join(root, n) for n in (*dirs, *files))]:
                os.chown(name, uid, gid)

    def _pidfile_ready(self) -> bool:
        """postmaster.pid names our process and says `ready` (its status line, PG 10+)."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        ours = self._proc is not None and lines[:1] == [str(self._proc.pid)]
        return ours and len(lines) >= 8 and lines[7].strip() == "ready"

    def _wait_ready(self, timeout: float) -> None:
        isready = [
            str(self.bin_dir / "pg_isready"),
            *("-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-t", "1"),
        ]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self._proc.poll() if self._proc is not None else -1
            if code is not None:
                raise PostgresError(
                    f"postgres exited with {code} on port {self.port}; log {self.log_path}:\n"
                    + _tail(self.log_path)
                )
            # pg_isready alone would also pass for another server on this port.
            if (
                self._pidfile_ready()
                and subprocess.run(isready, check=False, capture_output=True).returncode == 0
            ):
                return
            time.sleep(0.1)
        raise PostgresError(
            f"postgres not ready on port {self.port} after {timeout:.0f} s; "
            f"log {self.log_path}:\n" + _tail(self.log_path)
        )


EMBEDDED_PG_PORT = 5433
EMBEDDED_DB = "predictions"
"""The dev environment's database in the embedded cluster (embedded_database names each)."""


def embedded_database(env: Environment = "dev") -> str:
    """Environment `env`'s prediction log in the one embedded cluster: `predictions` in dev,
    `predictions_staging`, `predictions_prod`; one database each, so no row, tenant, key or
    job of one environment is ever read by another's services or monitor."""
    return EMBEDDED_DB if env == "dev" else f"{EMBEDDED_DB}_{env}"


def _left_running(pg: LocalPostgres) -> int | None:
    """The pid of a live postmaster already using this cluster's data directory, if any."""
    try:
        pid = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, owned by the postgres user
        return pid
    except (OSError, ValueError, IndexError):
        return None
    return pid


@contextlib.contextmanager
def prediction_db(
    settings: Settings, *, reuse_running: bool = False, role: str | None = None
) -> Iterator[str]:
    """DATABASE_URL if set; else this environment's database (embedded_database) in the
    embedded PostgreSQL under MLOPS_HOME/postgres.

    The embedded server is started here and stopped when the block ends. One already
    running (`make serve` in another terminal) is an error, or with `reuse_running` is
    used as it is and left running. Its schema is brought up to date, and with `role`
    (a service role of common.store.roles) the URL logs in as that role, not as the
    cluster's superuser, so row-level security holds in the embedded mode too.
    """
    if settings.database_url:
        yield settings.database_url
        return
    pg = LocalPostgres(settings.mlops_home / "postgres", port=EMBEDDED_PG_PORT)
    database = embedded_database(settings.mlops_env)
    left = _left_running(pg)
    if left is not None and reuse_running:
        pg.create_database(database)
        yield _as_role(pg.url(database), role)
        return
    if left is not None:
        raise UserError(
            f"an embedded PostgreSQL from an earlier run is still running (pid {left}, "
            f"{pg.data_dir}): stop it (`kill {left}`) or let that run finish first."
        )
    pg.start()
    try:
        pg.create_database(database)
        print(
            f"prediction log: embedded PostgreSQL at 127.0.0.1:{EMBEDDED_PG_PORT}/{database}",
            file=sys.stderr,
        )
        yield _as_role(pg.url(database), role)
    finally:
        pg.stop()


def _as_role(admin_url: str, role: str | None) -> str:
    """The embedded database migrated, and its URL as `role` (the superuser's if None)."""
    migrate(admin_url)
    if role is None:
        return admin_url
    roles.enable_login(admin_url, role)  # host logins are trusted in the embedded cluster
    return roles.role_url(admin_url, role)


def has_prediction_db(settings: Settings) -> bool:
    """Whether there is a prediction log to read: DATABASE_URL, or an embedded cluster made."""
    return bool(settings.database_url) or (settings.mlops_home / "postgres" / "data").is_dir()
