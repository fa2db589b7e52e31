"""manifest: the SHA-256 of every file of a model directory, written when it is logged and
checked before anything in it is loaded.

`manifest.json` sits beside MLmodel and lists each file's path, sha256 and size (itself
excluded). A file inside the artifacts can be rewritten with them, so the manifest's own
SHA-256 is also kept outside them, as the version's `model.manifest_sha256` tag
(common.registry.tags.MANIFEST_SHA256); `verify` checks both. Pure: files in, verdict out.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError

MANIFEST_FILE = "manifest.json"
MLFLOW_DOWNLOAD_META = "registered_model_meta"
"""What MLflow writes into every `models:/<name>/<version>` download (its name and
version): not one of the logged files, so not in the manifest."""
FORMAT = 1
_CHUNK = 1 << 20


class UntrustedModelError(UserError):
    """The model's files are not the ones registered, or it asks for a format this project
    does not load: nothing in it is loaded."""


@dataclass(frozen=True)
class Entry:
    sha256: str
    size: int


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path, ignore: Iterable[str]) -> dict[str, Path]:
    skip = {MANIFEST_FILE, MLFLOW_DOWNLOAD_META, *ignore}
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel in skip or path.is_dir():
            continue
        out[rel] = path
    return out


def build(root: Path, ignore: Iterable[str] = ()) -> dict[str, Entry]:
    """Path (relative, `/`-separated) -> sha256 and size, for every file under `root`."""
    return {
        rel: Entry(file_sha256(path), path.stat().st_size)
        for rel, path in _files(root, ignore).items()
    }


def encode(entries: Mapping[str, Entry]) -> bytes:
    """The manifest's bytes: canonical JSON, so its SHA-256 is stable."""
    files = {rel: {"sha256": e.sha256, "size": e.size} for rel, e in sorted(entries.items())}
    text = json.dumps({"format": FORMAT, "files": files}, indent=2, sort_keys=True)
    return (text + "\n").encode()


def write(root: Path) -> str:
    """Write `root/manifest.json` over the files there now; return the manifest's SHA-256."""
    data = encode(build(root))
    (root / MANIFEST_FILE).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _read(root: Path, what: str) -> tuple[dict[str, Entry], str]:
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise UntrustedModelError(
            f"{what} carries no {MANIFEST_FILE}: it was registered before models were sealed, "
            "or not by this pipeline; retrain and register it (`make demo`, or `dvc repro`)."
        )
    data = path.read_bytes()
    try:
        files = json.loads(data)["files"]
        entries = {str(k): Entry(str(v["sha256"]), int(v["size"])) for k, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UntrustedModelError(f"{what}: {MANIFEST_FILE} is not a manifest ({exc})") from exc
    return entries, hashlib.sha256(data).hexdigest()


def verify(root: Path, expected: str | None, what: str, ignore: Iterable[str] = ()) -> None:
    """Refuse (UntrustedModelError naming `what` and the file) unless the manifest's SHA-256
    is `expected` and every file under `root` is the one it lists, none missing, none extra.

    `expected` None: no trusted record of the manifest exists (an unsealed version): refused.
    """
    entries, digest = _read(root, what)
    if expected is None:
        raise UntrustedModelError(
            f"{what} has no model.manifest_sha256 tag: it was registered before models were "
            "sealed, or not by this pipeline; retrain and register it (`make demo`, or "
            "`dvc repro`)."
        )
    if digest != expected:
        raise UntrustedModelError(
            f"{what}: {MANIFEST_FILE} was changed after registration (sha256 {digest[:12]}..., "
            f"registered {expected[:12]}...); its files cannot be trusted."
        )
    files = _files(root, ignore)
    for rel in sorted(set(files) - set(entries)):
        raise UntrustedModelError(f"{what}: file {rel} is not in its {MANIFEST_FILE} (added)")
    for rel, entry in sorted(entries.items()):
        path = files.get(rel)
        if path is None:
            raise UntrustedModelError(f"{what}: file {rel} of its {MANIFEST_FILE} is missing")
        if path.stat().st_size != entry.size or file_sha256(path) != entry.sha256:
            raise UntrustedModelError(
                f"{what}: file {rel} differs from the one registered (sha256 mismatch)"
            )
