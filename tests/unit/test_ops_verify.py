"""`ops verify` on backups made by hand: what it refuses before any dump is read."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from common.errors import UserError
from scripts.ops.verify import verify


def _backup(root: Path, files: dict[str, bytes], listed: dict[str, bytes] | None = None) -> Path:
    """A backup with one bucket holding `files`; the manifest describes `listed` (or files)."""
    for rel, data in files.items():
        path = root / "s3" / "mlflow" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    objects = [
        {
            "key": rel,
            "file": f"s3/mlflow/{rel}",
            "bytes": len(data),
            "etag": hashlib.md5(data).hexdigest(),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        for rel, data in (listed or files).items()
    ]
    manifest: dict[str, Any] = {
        "format": 2,
        "databases": {},
        "buckets": {"mlflow": {"objects": objects}},
        "files": {},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_accepts_a_backup_whose_files_match_its_manifest(tmp_path: Path) -> None:
    verify(_backup(tmp_path, {"a/MLmodel": b"x" * 10, "b.bin": b"\0\1"}))


def test_names_a_truncated_object(tmp_path: Path) -> None:
    src = _backup(tmp_path, {"m.bin": b"abc"}, listed={"m.bin": b"abcdef"})
    with pytest.raises(UserError, match=r"m\.bin: 3 bytes, the manifest says 6 \(truncated\?\)"):
        verify(src)


def test_names_an_object_of_the_right_size_with_other_bytes(tmp_path: Path) -> None:
    src = _backup(tmp_path, {"m.bin": b"abd"}, listed={"m.bin": b"abc"})
    with pytest.raises(UserError, match=r"m\.bin: SHA-256 differs from the manifest"):
        verify(src)


def test_names_a_missing_object(tmp_path: Path) -> None:
    src = _backup(tmp_path, {}, listed={"gone.bin": b"abc"})
    with pytest.raises(UserError, match=r"gone\.bin: missing"):
        verify(src)


def test_refuses_a_manifest_pointing_outside_the_backup(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(b"abc")
    src = _backup(tmp_path / "b", {"x": b"abc"})
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["buckets"]["mlflow"]["objects"][0]["file"] = "../secret"
    (src / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"\.\./secret: outside the backup directory"):
        verify(src)


def test_refuses_a_backup_made_before_manifests_had_checksums(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"databases": {}, "buckets": {}}))
    with pytest.raises(UserError, match="without checksums"):
        verify(tmp_path)


def test_refuses_a_directory_that_is_not_a_backup(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"manifest\.json: not a backup made by `ops backup`"):
        verify(tmp_path)
