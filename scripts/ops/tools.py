"""Light helpers shared by the ops commands: PostgreSQL client tools, checksums.

Kept apart from `target` (which imports the stack and its store) so that `ops verify`
starts in a second or two: it needs the client tools and hashlib only.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

from common.errors import UserError
from common.settings import get_settings

FORMAT = 2
"""Manifest format: 2 has per-file checksums and row counts (1, the first one, had neither)."""


def pg_tool(name: str) -> str:
    """A PostgreSQL client program (pg_dump, pg_restore): in PG_BIN if set, else the newest
    /usr/lib/postgresql/*/bin, else on PATH. Client tools suffice (no server needed)."""
    pg_bin = get_settings().pg_bin
    if pg_bin is not None:
        if not (pg_bin / name).is_file():
            raise UserError(f"PG_BIN={pg_bin} holds no {name}")
        return str(pg_bin / name)
    found = [p for p in Path("/usr/lib/postgresql").glob(f"*/bin/{name}") if p.is_file()]
    if found:
        return str(max(found, key=lambda p: [int(n) for n in re.findall(r"\d+", p.parts[-3])]))
    if on_path := shutil.which(name):
        return on_path
    raise UserError(
        f"{name} not found: install the PostgreSQL client tools (as new as the server) "
        "or set PG_BIN to the directory holding them"
    )


def run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise UserError(f"{what} failed:\n{proc.stderr.strip() or proc.stdout.strip()}")


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
