"""`mlops`: the operator's command line for tenants, their API keys and the database schema.

    mlops tenants add acme --name "Acme Corp"
    mlops tenants keys create acme            # the key is printed once, on stdout
    mlops tenants keys rotate acme --grace-hours 24
    mlops tenants keys revoke acme <key_id>
    mlops tenants list
    mlops reviewers add alice ~/.ssh/id_ed25519.pub   # who may approve a promotion to prod
    mlops approve <flow-run-id> --key ~/.ssh/id_ed25519 [--reject]

It works on the database of DATABASE_URL (as its owner), else on the embedded one under
MLOPS_HOME. Messages go to stderr and keys alone to stdout, so `KEY=$(mlops tenants keys
create acme)` captures just the key. A mistake (a bad tenant id, an unknown tenant or key, a
database it cannot reach or may not change) is one paragraph and exit code 1; a bad
argument is argparse's usage and exit code 2.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import psycopg

from common import approvals
from common.errors import UserError, run_cli
from common.localpg import prediction_db
from common.settings import get_settings
from common.store import conninfo, jobs, migrate, tenants


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _utc(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


def _show_key(key: tenants.NewKey) -> None:
    """The key alone on stdout, one line about it on stderr (so `$(...)` captures the key)."""
    _say(
        f"key {key.key_id} for tenant {key.tenant_id} (scopes: {', '.join(key.scopes)}); "
        "shown only this once, store it now"
    )
    print(key.secret)


def _add(url: str, args: argparse.Namespace) -> None:
    tenant = tenants.add_tenant(url, args.tenant, args.name)
    _say(f"added tenant {tenant.id} ({tenant.name})")
    if args.with_key:
        _show_key(tenants.create_key(url, tenant.id, args.scope or tenants.DEFAULT_SCOPES))


def _list(url: str, args: argparse.Namespace) -> None:
    rows = tenants.list_tenants(url)
    width = max([len(t.id) for t in rows] + [6])
    print(f"{'TENANT':<{width}}  {'LIVE KEYS':>9}  {'CREATED':<23}  NAME")
    for t in rows:
        print(f"{t.id:<{width}}  {t.live_keys:>9}  {_utc(t.created_at):<23}  {t.name}")


def _remove(url: str, args: argparse.Namespace) -> None:
    removed = tenants.remove_tenant(url, args.tenant, purge=args.purge)
    counts = ", ".join(f"{n} {table}" for table, n in removed.items())
    _say(f"removed tenant {args.tenant} ({counts})")
    if not args.purge:
        _say("its predictions and labels stay; `--purge` deletes them too")


def _keys_create(url: str, args: argparse.Namespace) -> None:
    _show_key(tenants.create_key(url, args.tenant, args.scope or tenants.DEFAULT_SCOPES))


def _keys_list(url: str, args: argparse.Namespace) -> None:
    now = datetime.now(UTC)
    print(f"{'KEY ID':<16}  {'SCOPES':<22}  {'CREATED':<23}  STATE")
    for k in tenants.list_keys(url, args.tenant):
        if k.revoked_at is not None:
            state = f"revoked {_utc(k.revoked_at)}"
        elif k.expires_at is not None:
            state = f"{'expires' if k.expires_at > now else 'expired'} {_utc(k.expires_at)}"
        else:
            state = "live"
        print(f"{k.key_id}  {','.join(k.scopes):<22}  {_utc(k.created_at)}  {state}")


def _keys_rotate(url: str, args: argparse.Namespace) -> None:
    grace = timedelta(hours=args.grace_hours)
    key, old = tenants.rotate_key(url, args.tenant, args.scope, grace=grace)
    _show_key(key)
    if not old:
        _say(f"{args.tenant} had no live key to rotate out")
        return
    expiry = {k.key_id: k.expires_at for k in tenants.list_keys(url, args.tenant)}
    for key_id in old:
        until = expiry.get(key_id)
        if until is None or until <= datetime.now(UTC):
            _say(f"old key {key_id} has stopped working")
        else:
            _say(
                f"old key {key_id} keeps working until {_utc(until)}; revoke it sooner with: "
                f"mlops tenants keys revoke {args.tenant} {key_id}"
            )


def _keys_revoke(url: str, args: argparse.Namespace) -> None:
    if args.key_id is None and not args.all:
        raise UserError(
            f"name the key to revoke (see: mlops tenants keys list {args.tenant}), or pass --all"
        )
    revoked = tenants.revoke_key(url, args.tenant, None if args.all else args.key_id)
    if revoked:
        _say(f"revoked {', '.join(revoked)}: the predictor answers 401 to it from now on")
    else:
        _say(f"{args.tenant} had no live key; nothing revoked")


def _sql_role(url: str, args: argparse.Namespace) -> None:
    role, password = tenants.create_reader_role(url, args.tenant)
    _say(
        f"role {role} reads only {args.tenant}'s predictions, labels and jobs, and consumes its"
        f" response queue {jobs.queue_name(jobs.RESPONSE, args.tenant)}; its password, once:"
    )
    print(password)


def _db_upgrade(url: str, args: argparse.Namespace) -> None:
    applied = migrate(url)
    _say(f"applied {', '.join(applied)}" if applied else "schema up to date")


def _reviewers_add(args: argparse.Namespace) -> None:
    path = get_settings().reviewers_file
    try:
        text = Path(args.pubkey_file).expanduser().read_text()
    except OSError as exc:
        raise UserError(
            f"{args.pubkey_file}: cannot read the public key ({exc.strerror})"
        ) from None
    approvals.add_reviewer(path, args.name, text)
    _say(f"reviewer {args.name} may now approve promotions ({path})")


def _reviewers_list(args: argparse.Namespace) -> None:
    path = get_settings().reviewers_file
    reviewers = approvals.load_reviewers(path)
    if not reviewers:
        _say(f"no reviewer registered in {path} (mlops reviewers add NAME PUBKEY_FILE)")
    for reviewer in reviewers.values():
        print(reviewer.line)


def _reviewers_remove(args: argparse.Namespace) -> None:
    path = get_settings().reviewers_file
    approvals.remove_reviewer(path, args.name)
    _say(f"reviewer {args.name} removed from {path}")


def _approval_request(flow_run_id: UUID) -> approvals.Request:
    """What the paused promote_environment run asks to be signed (its flow run input)."""
    from prefect.input import read_flow_run_input  # noqa: PLC0415 (prefect: only here)

    value: Any = read_flow_run_input(approvals.REQUEST_KEY, flow_run_id=flow_run_id)
    if not isinstance(value, dict):
        raise UserError(
            f"flow run {flow_run_id} asks for no approval (not a promote_environment run "
            "waiting for one, or another Prefect API: PREFECT_API_URL)"
        )
    return approvals.Request(**{k: str(v) for k, v in value.items()})


def _approve(args: argparse.Namespace) -> None:
    from prefect.exceptions import FlowPauseTimeout, NotPausedError  # noqa: PLC0415
    from prefect.flow_runs import resume_flow_run  # noqa: PLC0415

    try:
        flow_run_id = UUID(args.flow_run_id)
    except ValueError:
        raise UserError(f"{args.flow_run_id!r} is not a flow run id (a UUID)") from None
    reviewers = approvals.load_reviewers(get_settings().reviewers_file)
    key = approvals.load_private_key(
        Path(args.key).expanduser(), lambda: getpass.getpass(f"passphrase for {args.key}: ")
    )
    reviewer = args.reviewer or approvals.reviewer_of(reviewers, key)
    request = _approval_request(flow_run_id)
    decision = approvals.REJECT if args.reject else approvals.APPROVE
    until = datetime.now(UTC) + timedelta(minutes=args.valid_minutes)
    answer = approvals.sign(key, request, reviewer, decision, until)
    try:
        resume_flow_run(flow_run_id, run_input=asdict(answer))
    except (NotPausedError, FlowPauseTimeout) as exc:
        raise UserError(f"flow run {flow_run_id} is not waiting for an approval: {exc}") from None
    _say(
        f"{reviewer} signed {decision} for {request.describe()} (valid until {answer.expires}); "
        "the flow run checks the signature and says whether it moved"
    )


def _minutes(text: str) -> float:
    try:
        minutes = float(text)
    except ValueError:
        minutes = -1.0
    if not 0 < minutes < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of minutes > 0")
    return minutes


def _hours(text: str) -> float:
    try:
        hours = float(text)
    except ValueError:
        hours = -1.0
    if not 0 <= hours < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of hours >= 0")
    return hours


def _approval_parsers(top: Any) -> None:
    """`mlops reviewers ...` and `mlops approve`: no database, so `local` commands."""
    rev = top.add_parser(
        "reviewers", help="who may approve a promotion to prod (Ed25519 keys)"
    ).add_subparsers(dest="command", required=True)
    radd = rev.add_parser("add", help="register NAME with an OpenSSH ssh-ed25519 public key")
    radd.add_argument("name")
    radd.add_argument("pubkey_file", help="e.g. ~/.ssh/id_ed25519.pub")
    radd.set_defaults(local=_reviewers_add)
    rev.add_parser("list", help="the registered reviewers").set_defaults(local=_reviewers_list)
    rrm = rev.add_parser("remove", help="stop NAME approving anything")
    rrm.add_argument("name")
    rrm.set_defaults(local=_reviewers_remove)

    approve = top.add_parser(
        "approve", help="sign and send your decision to a promote_environment run waiting on it"
    )
    approve.add_argument("flow_run_id")
    approve.add_argument("--key", required=True, help="your Ed25519 private key (OpenSSH)")
    approve.add_argument("--reject", action="store_true", help="reject instead of approve")
    approve.add_argument("--reviewer", help="your registered name (default: found by key)")
    approve.add_argument(
        "--valid-minutes",
        type=_minutes,
        default=60,
        help="how long the signed answer is valid (default: 60)",
    )
    approve.set_defaults(local=_approve)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlops", description=__doc__.splitlines()[0])
    top = parser.add_subparsers(dest="area", required=True)

    ten = top.add_parser("tenants", help="customers and their API keys").add_subparsers(
        dest="command", required=True
    )
    add = ten.add_parser("add", help="add a tenant (id: 1-32 of a-z, 0-9, '-')")
    add.add_argument("tenant")
    add.add_argument("--name", help="display name (default: the id)")
    add.add_argument("--with-key", action="store_true", help="also create its first key")
    add.add_argument("--scope", action="append", choices=tenants.SCOPES)
    add.set_defaults(run=_add)
    ten.add_parser("list", help="every tenant and its live keys").set_defaults(run=_list)
    rm = ten.add_parser("remove", help="remove a tenant and revoke its keys at once")
    rm.add_argument("tenant")
    rm.add_argument("--purge", action="store_true", help="delete its predictions and labels")
    rm.set_defaults(run=_remove)
    role = ten.add_parser("sql-role", help="a read-only SQL role seeing only this tenant")
    role.add_argument("tenant")
    role.set_defaults(run=_sql_role)

    keys = ten.add_parser("keys", help="create, list, rotate, revoke API keys").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser("create", help="a new key (default scopes: predict, feedback)")
    create.add_argument("tenant")
    create.add_argument("--scope", action="append", choices=tenants.SCOPES)
    create.set_defaults(run=_keys_create)
    listing = keys.add_parser("list", help="a tenant's keys (ids and states)")
    listing.add_argument("tenant")
    listing.set_defaults(run=_keys_list)
    rotate = keys.add_parser("rotate", help="a new key; the old ones expire after a grace")
    rotate.add_argument("tenant")
    rotate.add_argument("--scope", action="append", choices=tenants.SCOPES)
    rotate.add_argument(
        "--grace-hours",
        type=_hours,
        default=tenants.ROTATION_GRACE.total_seconds() / 3600,
        help="how long the old keys keep working (default: 24; 0 ends them now)",
    )
    rotate.set_defaults(run=_keys_rotate)
    revoke = keys.add_parser("revoke", help="end a key (or --all of them) now")
    revoke.add_argument("tenant")
    revoke.add_argument("key_id", nargs="?")
    revoke.add_argument("--all", action="store_true")
    revoke.set_defaults(run=_keys_revoke)

    _approval_parsers(top)

    db = top.add_parser("db", help="the prediction database").add_subparsers(
        dest="command", required=True
    )
    db.add_parser("upgrade", help="apply pending migrations (as the owner)").set_defaults(
        run=_db_upgrade
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    local: Callable[[argparse.Namespace], None] | None = getattr(args, "local", None)
    if local is not None:  # no database: reviewers and approvals
        local(args)
        return
    run: Callable[[str, argparse.Namespace], None] = args.run
    with prediction_db(get_settings(), reuse_running=True) as url:
        try:
            run(url, args)
        except psycopg.errors.UndefinedTable as exc:
            raise UserError(
                f"the prediction database {_where(url)} has no tenants yet "
                f"({exc.diag.message_primary}): run `mlops db upgrade` as its owner first"
            ) from None
        except psycopg.errors.InsufficientPrivilege as exc:
            raise UserError(
                f"{_where(url)} may not manage tenants ({exc.diag.message_primary}): set "
                "DATABASE_URL to the database's owner or a member of mlops_admin"
            ) from None
        except psycopg.OperationalError as exc:
            reason = str(exc).strip().splitlines()[0]
            raise UserError(
                f"cannot use the prediction database {_where(url)} (DATABASE_URL): {reason}"
            ) from None


def _where(url: str) -> str:
    """user@host:port/database of a URL, without its password."""
    parts = urlsplit(conninfo(url))
    return f"{parts.username or ''}@{parts.hostname or ''}:{parts.port or ''}{parts.path}"


def entry() -> None:
    """The `mlops` console script."""
    run_cli(main)


if __name__ == "__main__":
    entry()
