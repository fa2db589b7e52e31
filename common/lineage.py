"""What ties a model version to its inputs: git commit and DVC content hashes."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path


def file_md5(path: Path) -> str:
    """The md5 DVC 3 records for a single file (its content hash)."""
    digest = hashlib.md5()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit() -> str:
    """HEAD's commit, suffixed `-dirty` when tracked files changed; `unknown` outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha
