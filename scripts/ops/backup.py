"""`ops backup`: dumps, objects and state files, with a manifest of what each should be."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import IsolationLevel

from scripts.ops.target import Target, dump, keys, table_counts
from scripts.ops.tools import FORMAT, sha256

NOT_COVERED = (
    "grafana-data volume (Grafana's own users and dashboards edited in its UI; the provisioned "
    "ones come from the repository)",
    "prometheus-data volume (metrics history)",
    "predictor-state volume (spill files of log rows PostgreSQL had not taken yet; stop the "
    "predictor first and it flushes them)",
    "worker-state volume (the worker's project copy: dvc.lock, data/; it retrains from generate)",
    "PREFECT_HOME of the Prefect server and worker (local settings; flow runs and deployments "
    "are in the prefect database)",
)


def backup(target: Target, dest: Path, stopped: list[str] | None = None) -> dict[str, Any]:
    """Dump every database, copy every object and state file; write manifest.json last."""
    dest.mkdir(parents=True, exist_ok=False)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "stopped": stopped or [],
        "databases": {},
        "buckets": {},
        "files": {},
        "not_covered": list(NOT_COVERED),
    }
    for db in target.databases:
        out = dest / f"{db}.dump"
        tables = _dump_with_counts(target, db, out)
        manifest["databases"][db] = {
            "file": out.name,
            "bytes": out.stat().st_size,
            "sha256": sha256(out),
            "owner": target.owner(db),
            "tables": tables,
        }
        rows = sum(tables.values())
        print(f"  {db:12} {out.stat().st_size:>12,} bytes  {len(tables)} tables, {rows:,} rows")
    for bucket in target.buckets:
        objects = []
        for obj in keys(target.s3, bucket):
            rel = _object_file(dest, bucket, obj["Key"])
            path = dest / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            target.s3.download_file(bucket, obj["Key"], str(path))
            objects.append(
                {
                    "key": obj["Key"],
                    "file": rel,
                    "bytes": path.stat().st_size,
                    "etag": obj["ETag"],
                    "sha256": sha256(path),
                }
            )
        size = sum(o["bytes"] for o in objects)
        manifest["buckets"][bucket] = {"objects": objects, "bytes": size}
        print(f"  s3://{bucket:9} {len(objects):>6} objects {size:>12,} bytes")
    for name, live in target.state_dirs.items():
        if not live.is_dir():
            continue
        shutil.copytree(live, dest / name, symlinks=True)
        entries = [
            {
                "path": p.relative_to(dest / name).as_posix(),
                "bytes": p.stat().st_size,
                "sha256": sha256(p),
            }
            for p in sorted((dest / name).rglob("*"))
            if p.is_file() and not p.is_symlink()
        ]
        manifest["files"][name] = {"dir": name, "entries": entries}
        print(f"  {name:12} {len(entries):>6} files  {live}")
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _dump_with_counts(target: Target, db: str, out: Path) -> dict[str, int]:
    """pg_dump at the snapshot the row counts were taken in: the counts are the dump's."""
    with psycopg.connect(target.db_url(db)) as conn:
        conn.isolation_level = IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        row = conn.execute("SELECT pg_export_snapshot()").fetchone()
        snapshot = str(row[0]) if row else None
        tables = table_counts(conn)
        dump(target, db, out, snapshot)  # the transaction stays open while pg_dump imports it
        conn.rollback()
    return tables


def _object_file(dest: Path, bucket: str, key: str) -> str:
    """Where object `key` is kept in the backup: its key as a path, unless that is unsafe or
    clashes with another key's file ("a" beside "a/b"); then a name made from its hash."""
    parts = key.split("/")
    rel = f"s3/{bucket}/{key}"
    path = dest / rel
    clash = path.exists() or any(p.is_file() for p in path.parents if p != dest)
    if clash or any(part in ("", ".", "..") or part.startswith(".keys") for part in parts):
        return f"s3/{bucket}/.keys/{hashlib.sha256(key.encode()).hexdigest()}"
    return rel
