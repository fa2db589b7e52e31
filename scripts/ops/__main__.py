"""The `python -m scripts.ops` command line (see the package docstring)."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import run_cli
from common.settings import get_settings
from scripts import ops
from scripts.ops.verify import verify


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
    from scripts.ops import commands  # noqa: PLC0415 (the stack and its store: not for verify)

    commands.run(args)


if __name__ == "__main__":
    run_cli(main)
