"""`ops verify`: a backup's files are what its manifest says, and each dump reads to its end."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from common.errors import UserError
from scripts.ops.tools import FORMAT, pg_tool, run, sha256


def load_manifest(src: Path) -> dict[str, Any]:
    path = src / "manifest.json"
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a backup made by `ops backup` ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(
            f"{path}: a manifest without checksums (made before `ops verify` existed) or of "
            f"another format: it cannot be verified, so it is not restored"
        )
    return manifest


def expected_files(manifest: dict[str, Any]) -> list[tuple[str, int, str]]:
    """Every file the manifest lists, relative to the backup: (path, bytes, sha256)."""
    files = [(i["file"], i["bytes"], i["sha256"]) for i in manifest["databases"].values()]
    for info in manifest["buckets"].values():
        files += [(o["file"], o["bytes"], o["sha256"]) for o in info["objects"]]
    for info in manifest["files"].values():
        files += [(f"{info['dir']}/{e['path']}", e["bytes"], e["sha256"]) for e in info["entries"]]
    return files


def verify(src: Path) -> dict[str, Any]:
    """Check every listed file's size and SHA-256, then read each dump through pg_restore.

    Reads the backup only; raises a UserError naming every file that is missing or differs.
    """
    src = src.resolve()
    manifest = load_manifest(src)
    problems: list[str] = []
    total = 0
    files = expected_files(manifest)
    for rel, size, digest in files:
        path = (src / rel).resolve()
        if not path.is_relative_to(src):
            problems.append(f"{rel}: outside the backup directory")
        elif not path.is_file():
            problems.append(f"{path}: missing")
        elif (actual := path.stat().st_size) != size:
            problems.append(f"{path}: {actual:,} bytes, the manifest says {size:,} (truncated?)")
        elif sha256(path) != digest:
            problems.append(f"{path}: SHA-256 differs from the manifest (corrupted)")
        else:
            total += size
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise UserError(f"backup {src} does not match its manifest:\n  {shown}{more}")
    for db, info in manifest["databases"].items():
        # A full read: pg_restore decodes every data block (a truncated dump's table of
        # contents still lists; its data does not read).
        run(
            [pg_tool("pg_restore"), "--file", os.devnull, str(src / info["file"])],
            f"reading the dump of {db} ({src / info['file']})",
        )
    print(f"verified: {len(files)} files, {total:,} bytes, {len(manifest['databases'])} dumps read")
    return manifest
