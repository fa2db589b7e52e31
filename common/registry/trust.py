"""Sealing a logged model (its files' manifest) and checking one before it loads.

The train stage seals the model it logged: the files as stored are downloaded, their
manifest (models.manifest) is added to the model's artifacts, and its SHA-256 is returned,
which the register stage sets as the version's `model.manifest_sha256` tag. Every loader
(`served.fetch`, `served.from_dir`, the evaluate stage, the environment copy) calls
`check` before reading a file of the model.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from common.registry import tags as tag
from models import manifest
from models.manifest import UntrustedModelError

__all__ = ["UntrustedModelError", "check", "download_logged", "seal"]


def seal(client: MlflowClient, model_id: str) -> str:
    """Add `manifest.json` over the logged model's stored files; return its SHA-256."""
    with tempfile.TemporaryDirectory(prefix="mlops-seal-") as tmp:
        files = Path(tmp) / "model"
        files.mkdir()
        mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(files))
        digest = manifest.write(files)
        client.log_model_artifact(model_id, str(files / manifest.MANIFEST_FILE))
    return digest


def check(path: Path, tags: Mapping[str, str], what: str, ignore: Iterable[str] = ()) -> None:
    """Refuse (UntrustedModelError) unless `path` holds exactly the files sealed for the
    version whose tags are `tags` (`what` names it in the message)."""
    manifest.verify(path, tags.get(tag.MANIFEST_SHA256), what, ignore)


def download_logged(model_uri: str, expected: str | None, dst: Path) -> Path:
    """A logged model's files (`models:/<model_id>`) under `dst`, checked against the
    manifest SHA-256 the train stage recorded (`expected`)."""
    dst.mkdir(parents=True, exist_ok=True)
    mlflow.artifacts.download_artifacts(model_uri, dst_path=str(dst))
    manifest.verify(dst, expected, model_uri)
    return dst
