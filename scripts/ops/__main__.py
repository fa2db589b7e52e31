"""The `python -m scripts.ops` command line (see the package docstring)."""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime
from pathlib import Path

import boto3

from common.errors import UserError, run_cli
from common.settings import get_settings
from scripts import ops
from scripts.ops.backup import backup
from scripts.ops.restore import restore
from scripts.ops.target import CLIENTS, Target
from scripts.ops.upgrade import db_upgrade
from scripts.ops.verify import verify
from scripts.stack import Stack


def _state_dirs(specs: list[str]) -> dict[str, Path]:
    dirs: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(
                f"--state-dir {spec!r}: expected NAME=PATH, e.g. evidently=/srv/evidently"
            )
        dirs[name] = Path(path).resolve()
    return dirs


def _target(args: argparse.Namespace) -> Target:
    dirs = _state_dirs(args.state_dir)
    if args.pg_url:
        endpoint = args.s3_endpoint or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
        if not endpoint:
            raise UserError("--pg-url needs --s3-endpoint (or MLFLOW_S3_ENDPOINT_URL)")
        s3 = boto3.client("s3", endpoint_url=endpoint)
        return Target(args.pg_url.rstrip("/"), s3, state_dirs=dirs)
    stack = Stack.load(args.home)
    if not stack.running():
        raise UserError(f"the stack in {args.home} is not running: `make up` first")
    return Target(
        stack.pg.url(""),
        stack.s3(),
        stack,
        state_dirs={"evidently": stack.home / "evidently", **dirs},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(ops.__doc__ or "").splitlines()[0])
    parser.add_argument("--home", type=Path, default=get_settings().mlops_home / "stack")
    parser.add_argument("--pg-url", help="postgresql://user:password@host:port (no database)")
    parser.add_argument("--s3-endpoint", help="the S3 endpoint, with --pg-url")
    parser.add_argument(
        "--state-dir",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a directory of state to back up/restore as files (the local stack's Evidently "
        "workspace is evidently=<home>/evidently)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("db-upgrade", help="back up MLflow's database, then `mlflow db upgrade`")
    b = sub.add_parser("backup", help="dump every database, copy every object, with a manifest")
    b.add_argument("--dest", type=Path, help="default: MLOPS_HOME/backups/<UTC time>")
    b.add_argument(
        "--stop-clients",
        action="store_true",
        help="stop the stack's services for the backup (one consistent point in time across "
        "databases and buckets)",
    )
    v = sub.add_parser("verify", help="check a backup against its manifest; touches nothing live")
    v.add_argument("src", type=Path)
    r = sub.add_parser("restore", help="verify, restore beside the live data, swap it in")
    r.add_argument("src", type=Path)
    r.add_argument("--keep-old", action="store_true", help="keep the replaced databases/dirs")
    sub.add_parser("start-clients", help="start the stack's services a failed restore left stopped")
    args = parser.parse_args()
    if args.command == "verify":
        verify(args.src)
        print(f"backup {args.src.resolve()} is complete and readable")
        return
    target = _target(args)
    backups = get_settings().mlops_home.resolve() / "backups"
    if args.command == "db-upgrade":
        db_upgrade(target, backups)
    elif args.command == "backup":
        dest = args.dest or backups / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        if args.stop_clients:
            with target.clients_stopped() as stopped:
                backup(target, dest, stopped)
        else:
            backup(target, dest)
        print(f"backup: {dest}")
    elif args.command == "start-clients":
        states = target.stack.states() if target.stack else {}
        target.start_clients([n for n in CLIENTS if states.get(n) not in (None, "RUNNING")])
    else:
        restore(target, args.src, keep_old=args.keep_old)
        print(f"restored: {args.src}")


if __name__ == "__main__":
    run_cli(main)
