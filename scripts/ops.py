"""Operations on the full stack: MLflow schema upgrade, backup and restore.

    python -m scripts.ops db-upgrade         # back up MLflow's database, then `mlflow db upgrade`
    python -m scripts.ops backup [--dest D]  # pg_dump of every database + every bucket object
    python -m scripts.ops restore DIR        # put one back (databases replaced, objects re-put)

By default they act on the stack `make up` started (MLOPS_HOME/stack): its services that
use the databases are stopped for a restore or an upgrade and started again afterwards.
For another deployment (e.g. compose with the Postgres port published) pass --pg-url and
--s3-endpoint (credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and stop the
clients yourself: `docker compose stop mlflow prefect-server prefect-worker predictor worker`.

The URL's user is a superuser (it reads every database); each database keeps its owner
(the service role that owns it) through a restore or an upgrade, so the services can
still use it. Passwords reach pg_dump, pg_restore and `mlflow db upgrade` as PGPASSWORD,
never on their command lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import boto3
import psycopg
from psycopg import sql

from common.errors import UserError, run_cli
from common.localpg import find_bin_dir
from common.settings import get_settings
from scripts.stack import BUCKETS, DATABASES, JOB_WORKERS, Stack

CLIENTS = ("predictor", *JOB_WORKERS, "prefect-worker", "evidently", "prefect-server", "mlflow")
"""The stack's services that hold connections or files, stopped around a restore/upgrade."""


@dataclass
class Target:
    """Where the databases and buckets are, and (local topology) the stack that uses them."""

    pg_url: str  # the server, no database: postgresql://user[:password]@host:port
    s3: Any
    stack: Stack | None = None
    databases: tuple[str, ...] = DATABASES
    buckets: tuple[str, ...] = BUCKETS

    @property
    def evidently_dir(self) -> Path | None:
        """The local stack's Evidently workspace (a directory; in compose, a volume)."""
        return self.stack.home / "evidently" if self.stack else None

    def db_url(self, database: str) -> str:
        parts = urlsplit(self.pg_url)
        return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, ""))

    def libpq(self, database: str) -> tuple[str, dict[str, str]]:
        """`database`'s URL without the password, and an environment carrying it (PGPASSWORD)."""
        parts = urlsplit(self.db_url(database))
        env = dict(os.environ)
        userinfo, _, hostport = parts.netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        if password:
            env["PGPASSWORD"] = unquote(password)
        netloc = f"{user}@{hostport}" if user else hostport
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")), env

    def owner(self, database: str) -> str | None:
        """The role that owns `database`, or None if there is no such database."""
        with psycopg.connect(self.db_url("postgres")) as conn:
            row = conn.execute(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", [database]
            ).fetchone()
        return str(row[0]) if row else None

    @contextmanager
    def clients_stopped(self, clients: tuple[str, ...] = CLIENTS) -> Iterator[None]:
        """Stop these services of the stack for the block (no-op without a local stack)."""
        if self.stack is None:
            yield
            return
        states = self.stack.states()
        running = [name for name in clients if states.get(name) == "RUNNING"]
        if running:
            print(f"stopping {', '.join(running)}")
            self.stack.ctl("stop", *running)
        try:
            yield
        finally:
            if running:
                for name in reversed(running):  # mlflow and prefect-server before their clients
                    print(f"starting {name}")
                    self.stack.start(name)
                    self.stack.wait_healthy(name)


def _pg_tool(name: str) -> str:
    return str(find_bin_dir(get_settings().pg_bin) / name)


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise UserError(f"{what} failed:\n{proc.stderr.strip() or proc.stdout.strip()}")


def _dump(target: Target, db: str, out: Path) -> None:
    """`pg_dump -Fc` of one database into `out`."""
    url, env = target.libpq(db)
    _run([_pg_tool("pg_dump"), "-Fc", "-f", str(out), url], f"pg_dump {db}", env)


def backup(target: Target, dest: Path) -> dict[str, Any]:
    """Dump every database (pg_dump custom format) and copy every object; a manifest."""
    dest.mkdir(parents=True, exist_ok=False)
    manifest: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "databases": {},
        "buckets": {},
    }
    for db in target.databases:
        out = dest / f"{db}.dump"
        _dump(target, db, out)
        manifest["databases"][db] = {
            "file": out.name,
            "bytes": out.stat().st_size,
            "owner": target.owner(db),
        }
        print(f"  {db:12} {out.stat().st_size:>12,} bytes  {out}")
    for bucket in target.buckets:
        count = size = 0
        for key in _keys(target.s3, bucket):
            path = dest / "s3" / bucket / key
            path.parent.mkdir(parents=True, exist_ok=True)
            target.s3.download_file(bucket, key, str(path))
            count, size = count + 1, size + path.stat().st_size
        manifest["buckets"][bucket] = {"objects": count, "bytes": size}
        print(f"  s3://{bucket:9} {count:>6} objects {size:>12,} bytes")
    if target.evidently_dir and target.evidently_dir.is_dir():
        shutil.copytree(target.evidently_dir, dest / "evidently")
        manifest["evidently"] = "evidently"
        print(f"  evidently    {target.evidently_dir}")
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def restore(target: Target, src: Path) -> dict[str, Any]:
    """Replace each database by its dump and put every backed-up object back."""
    try:
        manifest: dict[str, Any] = json.loads((src / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{src / 'manifest.json'}: not a backup made by `ops backup`") from exc
    missing = [i["file"] for i in manifest["databases"].values() if not (src / i["file"]).is_file()]
    if missing:
        raise UserError(f"{src}: backup incomplete, missing {', '.join(missing)}")
    with target.clients_stopped():
        for db, info in manifest["databases"].items():
            # A backup that recorded its owners is restored by the superuser with every
            # object's owner as dumped (service roles exist in both stacks). An older one,
            # made when the superuser owned everything, goes to the database's owner.
            recorded = info.get("owner")
            owner = recorded or target.owner(db)
            name = sql.Identifier(db)
            with psycopg.connect(target.db_url("postgres"), autocommit=True) as conn:
                grants = _database_grants(conn, db)  # who may connect: kept across the drop
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
                create = sql.SQL("CREATE DATABASE {}").format(name)
                if owner:
                    create += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
                conn.execute(create)
                if grants is not None:
                    conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(name))
                    for grantee, privilege in grants:
                        conn.execute(
                            sql.SQL("GRANT {} ON DATABASE {} TO {}").format(
                                sql.SQL(privilege),
                                name,
                                sql.SQL("PUBLIC") if grantee is None else sql.Identifier(grantee),
                            )
                        )
            url, env = target.libpq(db)
            reown = [] if recorded else ["--no-owner", *([f"--role={owner}"] if owner else [])]
            _run(
                [
                    _pg_tool("pg_restore"),
                    *reown,
                    "--exit-on-error",
                    "-d",
                    url,
                    str(src / info["file"]),
                ],
                f"pg_restore {db}",
                env,
            )
            print(f"  {db:12} restored from {info['file']}")
        for bucket in manifest["buckets"]:
            root = src / "s3" / bucket
            files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
            for path in files:
                target.s3.upload_file(str(path), bucket, path.relative_to(root).as_posix())
            print(f"  s3://{bucket:9} {len(files)} objects put back")
        if manifest.get("evidently") and target.evidently_dir:
            shutil.rmtree(target.evidently_dir, ignore_errors=True)
            shutil.copytree(src / manifest["evidently"], target.evidently_dir)
            print(f"  evidently    {target.evidently_dir} restored")
    return manifest


def _database_grants(conn: psycopg.Connection[Any], db: str) -> list[tuple[str | None, str]] | None:
    """`db`'s privileges as (grantee or None for PUBLIC, privilege); None: the defaults."""
    row = conn.execute("SELECT datacl IS NULL FROM pg_database WHERE datname = %s", [db]).fetchone()
    if row is None or row[0]:
        return None
    return [
        (None if grantee == 0 else str(role), str(privilege))
        for grantee, role, privilege in conn.execute(
            "SELECT a.grantee, pg_get_userbyid(a.grantee), a.privilege_type"
            " FROM pg_database d, aclexplode(d.datacl) a WHERE d.datname = %s",
            [db],
        )
    ]


def db_upgrade(target: Target, backups: Path) -> None:
    """Back up MLflow's database, then migrate it to this MLflow's schema."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = backups / f"mlflow-before-upgrade-{stamp}.dump"
    out.parent.mkdir(parents=True, exist_ok=True)
    _dump(target, "mlflow", out)
    print(f"backup of the mlflow database: {out}")
    url, env = target.libpq("mlflow")
    url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    if owner := target.owner("mlflow"):  # new tables must be the mlflow role's, not ours
        url += ("&" if "?" in url else "?") + "options=" + quote(f"-c role={owner}")
    with target.clients_stopped(("mlflow",)):  # its only client; the rest speak HTTP to it
        _run(
            [str(Path(sys.executable).parent / "mlflow"), "db", "upgrade", url],
            "mlflow db upgrade",
            env,
        )
    print("mlflow db upgrade: the schema is at this MLflow's head")


def _keys(s3: Any, bucket: str) -> Iterator[str]:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            yield str(obj["Key"])


def _target(args: argparse.Namespace) -> Target:
    if args.pg_url:
        endpoint = args.s3_endpoint or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
        if not endpoint:
            raise UserError("--pg-url needs --s3-endpoint (or MLFLOW_S3_ENDPOINT_URL)")
        return Target(args.pg_url.rstrip("/"), boto3.client("s3", endpoint_url=endpoint))
    stack = Stack.load(args.home)
    if not stack.running():
        raise UserError(f"the stack in {args.home} is not running: `make up` first")
    return Target(stack.pg.url(""), stack.s3(), stack)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=get_settings().mlops_home / "stack")
    parser.add_argument("--pg-url", help="postgresql://user:password@host:port (no database)")
    parser.add_argument("--s3-endpoint", help="the S3 endpoint, with --pg-url")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("db-upgrade", help="back up MLflow's database, then `mlflow db upgrade`")
    b = sub.add_parser("backup", help="pg_dump every database, copy every bucket object")
    b.add_argument("--dest", type=Path, help="default: MLOPS_HOME/backups/<UTC time>")
    r = sub.add_parser("restore", help="replace the databases and re-put the objects of a backup")
    r.add_argument("src", type=Path)
    args = parser.parse_args()
    target = _target(args)
    backups = get_settings().mlops_home.resolve() / "backups"
    if args.command == "db-upgrade":
        db_upgrade(target, backups)
    elif args.command == "backup":
        dest = args.dest or backups / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        backup(target, dest)
        print(f"backup: {dest}")
    else:
        restore(target, args.src)
        print(f"restored: {args.src}")


if __name__ == "__main__":
    run_cli(main)
