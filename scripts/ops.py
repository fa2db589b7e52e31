"""Operations on the full stack: MLflow schema upgrade, backup and restore.

    python -m scripts.ops db-upgrade         # back up MLflow's database, then `mlflow db upgrade`
    python -m scripts.ops backup [--dest D]  # pg_dump of every database + every bucket object
    python -m scripts.ops restore DIR        # put one back (databases replaced, objects re-put)

By default they act on the stack `make up` started (MLOPS_HOME/stack): its services that
use the databases are stopped for a restore or an upgrade and started again afterwards.
For another deployment (e.g. compose with the Postgres port published) pass --pg-url and
--s3-endpoint (credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and stop the
clients yourself: `docker compose stop mlflow prefect-server prefect-worker predictor`.
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
from urllib.parse import urlsplit, urlunsplit

import boto3
import psycopg
from psycopg import sql

from common.errors import UserError, run_cli
from common.localpg import find_bin_dir
from common.settings import get_settings
from scripts.stack import BUCKETS, DATABASES, Stack

CLIENTS = ("predictor", "prefect-worker", "evidently", "prefect-server", "mlflow")
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


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise UserError(f"{what} failed:\n{proc.stderr.strip() or proc.stdout.strip()}")


def _dump(target: Target, db: str, out: Path) -> None:
    """`pg_dump -Fc` of one database into `out`."""
    _run([_pg_tool("pg_dump"), "-Fc", "-f", str(out), target.db_url(db)], f"pg_dump {db}")


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
        manifest["databases"][db] = {"file": out.name, "bytes": out.stat().st_size}
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
            with psycopg.connect(target.db_url("postgres"), autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db))
                )
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
            _run(
                [
                    _pg_tool("pg_restore"),
                    "--no-owner",
                    "--exit-on-error",
                    "-d",
                    target.db_url(db),
                    str(src / info["file"]),
                ],
                f"pg_restore {db}",
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


def db_upgrade(target: Target, backups: Path) -> None:
    """Back up MLflow's database, then migrate it to this MLflow's schema."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = backups / f"mlflow-before-upgrade-{stamp}.dump"
    out.parent.mkdir(parents=True, exist_ok=True)
    _dump(target, "mlflow", out)
    print(f"backup of the mlflow database: {out}")
    url = target.db_url("mlflow").replace("postgresql://", "postgresql+psycopg://", 1)
    with target.clients_stopped(("mlflow",)):  # its only client; the rest speak HTTP to it
        _run(
            [str(Path(sys.executable).parent / "mlflow"), "db", "upgrade", url], "mlflow db upgrade"
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
