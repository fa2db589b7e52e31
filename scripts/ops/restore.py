"""`ops restore`: verify, restore beside the live data, check, then swap it in.

Each database is restored into a new database in one transaction and its row counts are
checked against the manifest before any live database is touched; the swap renames them all
in one transaction (the old ones renamed aside). Buckets are then mirrored exactly and the
state directories swapped by rename. The old databases are dropped only once all of that
succeeded (or kept with --keep-old).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from common.errors import UserError
from scripts.ops.target import Target, keys, table_counts
from scripts.ops.tools import pg_tool, run
from scripts.ops.verify import verify


def restore(target: Target, src: Path, keep_old: bool = False) -> dict[str, Any]:
    """Put a verified backup back; on failure nothing live has been dropped."""
    src = src.resolve()
    manifest = verify(src)
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    with target.clients_stopped():
        staged = _stage_databases(target, src, manifest, stamp)
        try:
            dirs = _stage_dirs(target, src, manifest, stamp)
        except Exception as exc:
            _drop(target, list(staged.values()))
            _remove(
                target.state_dirs[n].with_name(f".{target.state_dirs[n].name}.restore-{stamp}")
                for n in target.state_dirs
            )
            raise UserError(
                f"restore failed before anything live was touched: copying the state "
                f"directories: {exc}\nThe live databases are unchanged; the new copies "
                "were dropped."
            ) from exc
        old_dirs: list[Path] = []
        try:
            old_dbs = _swap_databases(target, staged, stamp)
        except Exception:
            _remove(dirs.values())
            raise
        try:
            for bucket, info in manifest["buckets"].items():
                _mirror(target, src, bucket, info["objects"])
            for live, new in dirs.items():
                old_dirs += _swap_dir(live, new, stamp)
        except Exception as exc:
            _remove(new for new in dirs.values() if new.exists())
            kept = ", ".join(old_dbs) or "none"
            raise UserError(
                f"{exc}\nThe databases were already swapped in; the previous ones are kept as "
                f"{kept} (rename them back to undo). Buckets and state directories may be "
                "partly restored: run the restore again once the cause is fixed."
            ) from exc
        if keep_old:
            if old_dbs or old_dirs:
                print(f"kept the previous state: {', '.join([*old_dbs, *map(str, old_dirs)])}")
        else:
            _drop(target, old_dbs)
            _remove(old_dirs)
    return manifest


def _stage_databases(
    target: Target, src: Path, manifest: dict[str, Any], stamp: str
) -> dict[str, str]:
    """Restore each dump into `<db>_restore_<stamp>` and check its row counts (live -> new)."""
    staged: dict[str, str] = {}
    try:
        for db, info in manifest["databases"].items():
            new = f"{db}_restore_{stamp}"
            _create_like(target, db, new, info.get("owner"))
            staged[db] = new
            url, env = target.libpq(new)
            run(
                [
                    pg_tool("pg_restore"),
                    "--single-transaction",
                    "--exit-on-error",
                    "-d",
                    url,
                    str(src / info["file"]),
                ],
                f"pg_restore of {src / info['file']} into {new}",
                env,
            )
            with psycopg.connect(target.db_url(new)) as conn:
                counts = table_counts(conn)
            if counts != info["tables"]:
                diff = sorted(
                    f"{t}: {counts.get(t, 'missing')} rows, "
                    f"manifest {info['tables'].get(t, 'none')}"
                    for t in set(counts) | set(info["tables"])
                    if counts.get(t) != info["tables"].get(t)
                )
                raise UserError(f"{new} (from {info['file']}): " + "; ".join(diff[:10]))
            print(
                f"  {db:12} restored into {new}: {sum(counts.values()):,} rows as in the manifest"
            )
    except Exception as exc:
        _drop(target, list(staged.values()))
        raise UserError(
            f"restore failed before anything live was touched: {exc}\n"
            "The live databases are unchanged; the new copies "
            f"({', '.join(staged.values()) or 'none'}) were dropped."
        ) from exc
    return staged


def _create_like(target: Target, live: str, new: str, recorded_owner: str | None) -> None:
    """Create `new` with the owner and CONNECT rights `live` has (or the recorded owner)."""
    owner = recorded_owner or target.owner(live)
    name = sql.Identifier(new)
    with psycopg.connect(target.db_url("postgres"), autocommit=True) as conn:
        create = sql.SQL("CREATE DATABASE {}").format(name)
        if owner:
            create += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
        conn.execute(create)
        grants = _database_grants(conn, live)
        if grants is None:
            return
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(name))
        for grantee, privilege in grants:
            conn.execute(
                sql.SQL("GRANT {} ON DATABASE {} TO {}").format(
                    sql.SQL(privilege),
                    name,
                    sql.SQL("PUBLIC") if grantee is None else sql.Identifier(grantee),
                )
            )


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


def _swap_databases(target: Target, staged: dict[str, str], stamp: str) -> list[str]:
    """Rename every live database aside and every new one to its name, in one transaction."""
    old: list[str] = []
    names = [*staged, *staged.values()]
    try:
        with psycopg.connect(target.db_url("postgres"), autocommit=True) as conn:
            live = {
                str(r[0])
                for r in conn.execute(
                    "SELECT datname FROM pg_database WHERE datname = ANY(%s)", [list(staged)]
                )
            }
            _disconnect(conn, names)
            with conn.transaction():
                for db, new in staged.items():
                    if db in live:
                        aside = f"{db}_old_{stamp}"
                        conn.execute(_rename(db, aside))
                        old.append(aside)
                    conn.execute(_rename(new, db))
    except psycopg.Error as exc:
        old.clear()
        _drop(target, list(staged.values()))
        raise UserError(
            f"restore failed while swapping the databases in ({exc}); the swap was one "
            "transaction, so the live databases are unchanged and the new copies were dropped"
        ) from exc
    print(f"  swapped in: {', '.join(staged)}")
    return old


def _rename(name: str, to: str) -> sql.Composed:
    return sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
        sql.Identifier(name), sql.Identifier(to)
    )


def _disconnect(conn: psycopg.Connection[Any], names: list[str], timeout: float = 15) -> None:
    """End every other session on these databases (a rename needs none) and wait for them."""
    deadline = time.monotonic() + timeout
    while True:
        row = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = ANY(%s) AND pid <> pg_backend_pid()",
            [names],
        ).fetchone()
        if not row or row[0] == 0 or time.monotonic() > deadline:
            return
        time.sleep(0.2)


def _drop(target: Target, names: list[str]) -> None:
    """Drop these databases (best effort: a leftover is named by the caller's message)."""
    if not names:
        return
    with psycopg.connect(target.db_url("postgres"), autocommit=True) as conn:
        for name in names:
            try:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
            except psycopg.Error as exc:
                print(f"  could not drop {name}: {exc}")


def _mirror(target: Target, src: Path, bucket: str, objects: list[dict[str, Any]]) -> None:
    """Make `bucket` hold exactly the backup's objects: extra ones deleted, changed re-put."""
    s3 = target.s3
    if bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
        s3.create_bucket(Bucket=bucket)
    want = {o["key"]: o for o in objects}
    live = {o["Key"]: o for o in keys(s3, bucket)}
    extra = sorted(set(live) - set(want))
    for i in range(0, len(extra), 1000):
        batch = [{"Key": k} for k in extra[i : i + 1000]]
        s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
    put = 0
    for key, obj in want.items():
        have = live.get(key)
        if have and have["Size"] == obj["bytes"] and have["ETag"] == obj["etag"]:
            continue  # unchanged since the backup (same size and ETag on this server)
        s3.upload_file(str(src / obj["file"]), bucket, key)
        put += 1
    after = {o["Key"]: o["Size"] for o in keys(s3, bucket)}
    if after != {k: o["bytes"] for k, o in want.items()}:
        wrong = sorted(set(after) ^ set(want))[:5]
        raise UserError(
            f"s3://{bucket} does not hold the backup's objects after the restore: {wrong}"
        )
    print(
        f"  s3://{bucket:9} {len(want)} objects: {put} put back, "
        f"{len(extra)} not in the backup deleted"
    )


def _stage_dirs(
    target: Target, src: Path, manifest: dict[str, Any], stamp: str
) -> dict[Path, Path]:
    """Copy each backed-up state directory beside its live one (live -> staged copy)."""
    staged: dict[Path, Path] = {}
    for name, info in manifest["files"].items():
        live = target.state_dirs.get(name)
        if live is None:
            print(f"  {name}: not restored (no live directory given for it)")
            continue
        new = live.with_name(f".{live.name}.restore-{stamp}")
        shutil.copytree(src / info["dir"], new, symlinks=True)
        staged[live] = new
    return staged


def _remove(paths: Iterable[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def _swap_dir(live: Path, new: Path, stamp: str) -> list[Path]:
    """Rename `live` aside and `new` into its place; the old one, if any, to remove later."""
    old = live.with_name(f".{live.name}.old-{stamp}")
    had = live.exists()
    if had:
        live.rename(old)
    new.rename(live)
    print(f"  {live} restored")
    return [old] if had else []
