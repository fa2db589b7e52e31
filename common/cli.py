"""`mlops`: the operator's command line for tenants, their API keys and the database schema.

    mlops tenants add acme --name "Acme Corp"
    mlops tenants keys create acme            # the key is printed once, on stdout
    mlops tenants keys rotate acme --grace-hours 24
    mlops tenants keys revoke acme <key_id>
    mlops tenants list

It works on the database of DATABASE_URL (as its owner), else on the embedded one under
MLOPS_HOME. Messages go to stderr and keys alone to stdout, so `KEY=$(mlops tenants keys
create acme)` captures just the key. A mistake (a bad tenant id, an unknown tenant or key, a
database it cannot reach or may not change) is one paragraph and exit code 1; a bad
argument is argparse's usage and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import psycopg

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


def _hours(text: str) -> float:
    try:
        hours = float(text)
    except ValueError:
        hours = -1.0
    if not 0 <= hours < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of hours >= 0")
    return hours


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

    db = top.add_parser("db", help="the prediction database").add_subparsers(
        dest="command", required=True
    )
    db.add_parser("upgrade", help="apply pending migrations (as the owner)").set_defaults(
        run=_db_upgrade
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
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
