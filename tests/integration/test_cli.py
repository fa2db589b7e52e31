"""The `mlops` command line, run as an operator runs it: a subprocess on a real PostgreSQL.

Keys go to stdout alone (so `KEY=$(mlops tenants keys create acme)` captures just the key),
everything else to stderr; a mistake is exit code 1 (or argparse's 2) and one paragraph
naming what was wrong, never a traceback.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from common.localpg import LocalPostgres
from common.store import (
    Prediction,
    create_staging,
    migration_names,
    roles,
    tenants,
    write_items,
)
from common.store.connection import connect
from tests.servers import VENV_BIN, clean_env

pytestmark = pytest.mark.integration

KEY = re.compile(r"^mlops_([0-9a-f]{16})_[A-Za-z0-9_-]{43}$")
MIGRATIONS = ", ".join(migration_names())


@dataclass(frozen=True)
class Cli:
    """`mlops` against one database, from a directory with no `.env` and its own home."""

    url: str
    home: Path

    def __call__(
        self, *args: str, code: int = 0, url: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(VENV_BIN / "mlops"), *args],
            cwd=self.home,
            env=clean_env(DATABASE_URL=url or self.url, MLOPS_HOME=str(self.home)),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == code, f"mlops {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc


def new_database(postgres: LocalPostgres) -> str:
    postgres.start()
    name = f"cli_{uuid.uuid4().hex[:12]}"
    postgres.create_database(name)
    return postgres.url(name)


@pytest.fixture(scope="module")
def mlops(postgres: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Cli:
    """The CLI on a database it upgraded itself, holding one tenant (`known`) with a key."""
    cli = Cli(new_database(postgres), tmp_path_factory.mktemp("cli-home"))
    cli("db", "upgrade")
    cli("tenants", "add", "known")
    cli("tenants", "keys", "create", "known")
    return cli


def stderr_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one line the command wrote to stderr."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def new_key(proc: subprocess.CompletedProcess[str]) -> str:
    """The key a command printed: the whole of its stdout."""
    assert KEY.match(proc.stdout.rstrip("\n")), proc.stdout
    assert proc.stdout.count("\n") == 1, proc.stdout
    return proc.stdout.strip()


def tenant_rows(cli: Cli) -> dict[str, str]:
    """`mlops tenants list`'s rows by tenant id."""
    return {line.split()[0]: line for line in cli("tenants", "list").stdout.splitlines()[1:]}


def live_keys(url: str, tenant: str) -> int:
    return next(t.live_keys for t in tenants.list_tenants(url) if t.id == tenant)


def state(url: str) -> list[object]:
    """Every tenant and key as the database holds them."""
    found = tenants.list_tenants(url)
    return [*found, *(k for t in found for k in tenants.list_keys(url, t.id))]


def key_id(key: str) -> str:
    found = KEY.match(key)
    assert found, key
    return found.group(1)


def test_db_upgrade_creates_the_schema_once_and_tenants_need_it(
    postgres: LocalPostgres, tmp_path: Path
) -> None:
    cli = Cli(new_database(postgres), tmp_path)
    before = cli("tenants", "list", code=1)
    assert "run `mlops db upgrade` as its owner first" in stderr_line(before)
    assert stderr_line(cli("db", "upgrade")) == f"applied {MIGRATIONS}"
    assert stderr_line(cli("db", "upgrade")) == "schema up to date"
    listing = cli("tenants", "list").stdout.splitlines()
    assert listing[0].split() == ["TENANT", "LIVE", "KEYS", "CREATED", "NAME"]
    assert listing[1].startswith("default ")
    assert listing[1].endswith("Default tenant")


def test_adds_lists_and_removes_a_tenant(mlops: Cli) -> None:
    added = mlops("tenants", "add", "acme", "--name", "Acme Corp")
    assert added.stdout == ""
    assert stderr_line(added) == "added tenant acme (Acme Corp)"
    acme = tenant_rows(mlops)["acme"]
    assert acme.split()[1] == "0"  # live keys
    assert acme.endswith(" UTC  Acme Corp")

    removed = mlops("tenants", "remove", "acme")
    assert "removed tenant acme" in removed.stderr
    assert "acme" not in mlops("tenants", "list").stdout


def test_keys_create_prints_only_the_key_and_one_note(mlops: Cli) -> None:
    mlops("tenants", "add", "hooli")
    proc = mlops("tenants", "keys", "create", "hooli")
    key = new_key(proc)
    note = stderr_line(proc)
    assert key_id(key) in note
    assert "hooli" in note
    assert "shown only this once" in note
    assert key not in proc.stderr

    who = tenants.authenticate(mlops.url, key)
    assert who is not None
    assert (who.tenant_id, who.scopes) == ("hooli", frozenset({"predict", "feedback"}))
    assert live_keys(mlops.url, "hooli") == 1
    listed = mlops("tenants", "keys", "list", "hooli").stdout
    assert re.search(rf"^{key_id(key)}  predict,feedback .* live$", listed, re.M), listed
    assert key.rsplit("_", 1)[1] not in listed  # the secret is not kept


def test_add_with_key_gives_the_first_key_with_the_scopes_asked_for(mlops: Cli) -> None:
    proc = mlops("tenants", "add", "initech", "--with-key", "--scope=predict", "--scope=admin")
    who = tenants.authenticate(mlops.url, new_key(proc))
    assert who is not None
    assert (who.tenant_id, who.scopes) == ("initech", frozenset({"predict", "admin"}))


def test_rotate_prints_the_new_key_and_when_the_old_one_stops(mlops: Cli) -> None:
    mlops("tenants", "add", "umbrella")
    old = new_key(mlops("tenants", "keys", "create", "umbrella"))
    asked = datetime.now(UTC)
    rotated = mlops("tenants", "keys", "rotate", "umbrella", "--grace-hours", "2")
    new = new_key(rotated)
    assert key_id(new) in rotated.stderr
    when = re.search(
        rf"old key {key_id(old)} keeps working until (\S+ \S+) UTC; revoke it sooner with: "
        rf"mlops tenants keys revoke umbrella {key_id(old)}",
        rotated.stderr,
    )
    assert when, rotated.stderr
    until = datetime.strptime(when.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    assert abs(until - (asked + timedelta(hours=2))) < timedelta(minutes=2)
    assert tenants.authenticate(mlops.url, old) is not None  # both work during the overlap
    assert tenants.authenticate(mlops.url, new) is not None

    revoked = mlops("tenants", "keys", "revoke", "umbrella", key_id(old))
    assert key_id(old) in stderr_line(revoked)
    assert "401" in revoked.stderr
    assert tenants.authenticate(mlops.url, old) is None
    assert tenants.authenticate(mlops.url, new) is not None

    ended = mlops("tenants", "keys", "rotate", "umbrella", "--grace-hours", "0")
    assert f"old key {key_id(new)} has stopped working" in ended.stderr
    assert tenants.authenticate(mlops.url, new) is None
    assert tenants.authenticate(mlops.url, new_key(ended)) is not None


def test_revoke_all_ends_every_key_of_the_tenant_at_once(mlops: Cli) -> None:
    mlops("tenants", "add", "vandelay")
    keys = [new_key(mlops("tenants", "keys", "create", "vandelay")) for _ in range(2)]
    revoked = stderr_line(mlops("tenants", "keys", "revoke", "vandelay", "--all"))
    assert all(key_id(k) in revoked for k in keys)
    assert all(tenants.authenticate(mlops.url, k) is None for k in keys)
    listing = mlops("tenants", "keys", "list", "vandelay").stdout.splitlines()[1:]
    assert len(listing) == 2
    assert all(" revoked " in line for line in listing)
    assert live_keys(mlops.url, "vandelay") == 0


def test_sql_role_reads_only_its_own_tenants_rows(mlops: Cli) -> None:
    mlops("tenants", "add", "soylent")
    t0 = datetime.now(UTC)
    rows = [
        Prediction(str(uuid.uuid4()), t0, "m", "1", {"x": i}, "1", {"1": 0.9}, 1.0, tenant)
        for i, tenant in enumerate(["soylent", "known", "soylent"])
    ]
    with connect(mlops.url) as conn:  # the owner logs them, as the predictor would
        create_staging(conn)
        write_items(conn, rows)

    proc = mlops("tenants", "sql-role", "soylent")
    password = proc.stdout.strip()
    assert len(password) >= 24
    assert proc.stdout.count("\n") == 1
    assert "tenant_soylent" in stderr_line(proc)
    reader = roles.role_url(mlops.url, "tenant_soylent", password)
    with connect(reader) as conn:  # no WHERE, no scope: still only its own rows
        seen = conn.execute("SELECT tenant_id, count(*) FROM predictions GROUP BY 1").fetchall()
        assert seen == [("soylent", 2)]
        conn.execute("SELECT set_config('mlops.tenant', 'known', false)")
        forged = conn.execute("SELECT count(*) FROM predictions WHERE tenant_id = 'known'")
        assert forged.fetchone() == (0,)


@pytest.mark.parametrize(
    ("args", "code", "names"),
    [
        (["tenants", "add", "Acme_Corp"], 1, "tenant id 'Acme_Corp' is not valid"),
        (["tenants", "add", "known"], 1, "tenant 'known' exists already"),
        (["tenants", "keys", "create", "nobody"], 1, "no tenant 'nobody'"),
        (["tenants", "remove", "nobody"], 1, "no tenant 'nobody'"),
        (["tenants", "sql-role", "nobody"], 1, "no tenant 'nobody'"),
        (
            ["tenants", "keys", "revoke", "known", "0123456789abcdef"],
            1,
            "no live key '0123456789abcdef'",
        ),
        (["tenants", "keys", "revoke", "known"], 1, "name the key to revoke"),
        (["tenants", "keys", "create", "known", "--scope", "root"], 2, "invalid choice: 'root'"),
        (["tenants", "keys", "rotate", "known", "--grace-hours", "-1"], 2, "'-1' is not"),
    ],
    ids=[
        "bad-tenant-id",
        "existing-tenant",
        "unknown-tenant",
        "remove-unknown-tenant",
        "role-of-unknown-tenant",
        "unknown-key-id",
        "revoke-without-key",
        "bad-scope",
        "negative-grace",
    ],
)
def test_a_mistake_is_one_paragraph_naming_it_and_changes_nothing(
    mlops: Cli, args: list[str], code: int, names: str
) -> None:
    before = state(mlops.url)
    proc = mlops(*args, code=code)
    assert proc.stdout == ""
    assert names in proc.stderr
    if code == 1:
        assert stderr_line(proc).startswith("error: ")
    else:  # argparse: the usage, then one line naming the argument
        assert proc.stderr.strip().splitlines()[-1].startswith("mlops tenants ")
    assert state(mlops.url) == before


def test_a_database_it_cannot_use_is_named_without_its_password(mlops: Cli) -> None:
    down = mlops("tenants", "list", code=1, url="postgresql://ops:s3cret@127.0.0.1:1/preds")
    line = stderr_line(down)
    assert line.startswith("error: cannot use the prediction database ops@127.0.0.1:1/preds")
    assert "s3cret" not in line

    roles.enable_login(mlops.url, roles.PREDICTOR)
    service = roles.role_url(mlops.url, roles.PREDICTOR)
    refused = stderr_line(mlops("tenants", "add", "sneaky", code=1, url=service))
    assert "mlops_predictor@" in refused
    assert "may not manage tenants" in refused
