"""The ops commands that act on a live stack (all but `verify`, which reads a backup only)."""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime
from pathlib import Path

import boto3

from common.errors import UserError
from common.settings import get_settings
from scripts.ops.backup import backup
from scripts.ops.restore import restore
from scripts.ops.target import CLIENTS, Target
from scripts.ops.upgrade import db_upgrade
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
    state = {"evidently": stack.home / "evidently", **dirs}
    return Target(stack.pg.url(""), stack.s3(), stack, state_dirs=state)


def run(args: argparse.Namespace) -> None:
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
