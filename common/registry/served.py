"""One model version to serve: alias -> version -> local files -> scorer, written once.

The predictor, the monitor and batch-score flows and the Bento packaging all hold a
`ServedModel`. Resolution always takes the registered model's name, so a lookup per
tenant (its own model, else the shared one) is a choice of name, then `fetch`:

    mv = registry.version_by_alias(client, tenant_model, alias) or version_for(
        client, shared_model, alias
    )
    model = fetch(mv, cache_dir, alias=alias)
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from common import registry
from common.errors import UserError
from common.registry import tags as tag
from common.registry import trust
from common.settings import Settings
from models.predict import Scorer, load_pipeline, record_model

Source = Literal["registry", "bundled"]

TAGS_FILE = "registry_tags.json"
"""Written beside a bundled model: its registry tags and version, for /model when offline."""
VERSION_KEY = "version"
"""The key of the version number in TAGS_FILE (beside the version's own tags)."""
BUNDLE_FILES = (TAGS_FILE, "model.yaml")
"""What a bundle holds beside the version's sealed files: its tags, and BentoML's own
description of the model it stores (`model.yaml`), read by BentoML, never loaded here."""
EXTRA_FILES = "extra_files"
"""Where `log_model(extra_files=...)` puts the files a version carries, in its directory."""


def cache_dir(settings: Settings) -> Path:
    """Where this machine keeps downloaded versions: one folder for every process (the
    predictor, the flows, the gate), each version downloaded once (`download_version`)."""
    return settings.mlops_home.resolve() / "model-cache"


class AliasNotFoundError(UserError):
    """The registered model has no version under the alias (or does not exist)."""


@dataclass(frozen=True)
class ServedModel:
    """A model version's files on local disk, its tags, and what loads from them (once)."""

    name: str
    version: str
    alias: str | None
    path: Path
    tags: Mapping[str, str] = field(default_factory=dict)
    source: Source = "registry"
    loaded_at: str = field(
        default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"), compare=False
    )

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def prefers_onnx(self) -> bool:
        """ONNX only when the version's parity check passed; otherwise the sklearn pipeline."""
        return tag.onnx_ok(self.tags)

    @cached_property
    def pipeline(self) -> Any:
        """The fitted sklearn pipeline itself, as `evaluate` scored it: what the gate compares
        (read with skops and the types trusted in code, never through the MLmodel's loader)."""
        return load_pipeline(self.path, what=self.uri)

    @cached_property
    def scorer(self) -> Scorer:
        """The scorer, loaded and self-checked on first use (a bad model raises ModelError)."""
        scorer = Scorer.load(self.path, prefer_onnx=self.prefers_onnx, what=self.uri)
        scorer.self_check()
        return scorer

    @cached_property
    def record(self) -> type[BaseModel]:
        """The pydantic model one request record must fit."""
        return record_model(self.scorer)

    @cached_property
    def unbounded_record(self) -> type[BaseModel]:
        """The request model without the data contract's ranges (PREDICT_OUT_OF_RANGE=flag)."""
        return record_model(self.scorer, bounded=False)

    def load(self) -> ServedModel:
        """Load the scorer and the request model now (before a swap, not on a request)."""
        _ = self.record
        return self

    @property
    def lineage(self) -> dict[str, str]:
        """The tags that tie the version to its inputs and decisions (tags.LINEAGE)."""
        return {k: self.tags[k] for k in tag.LINEAGE if k in self.tags}

    def reference(self) -> pd.DataFrame:
        """The scored holdout the version logged (features, label, predictions).

        Versions trained before the scored holdout existed logged only the reference sample.
        """
        # Here, not at the top: the predictor never needs the training stack (skl2onnx).
        from models.train import HOLDOUT_SCORED_FILE, REFERENCE_FILE  # noqa: PLC0415

        extra = self.path / EXTRA_FILES
        for name in (HOLDOUT_SCORED_FILE, REFERENCE_FILE):
            if (extra / name).is_file():
                return pd.read_parquet(extra / name)
        raise UserError(
            f"{self.name} v{self.version} carries no reference data "
            f"({EXTRA_FILES}/{HOLDOUT_SCORED_FILE}); retrain it with this project's train stage."
        )

    def bundle(self, dest: Path) -> Path:
        """Copy the version's files into `dest` with its tags in TAGS_FILE, for `from_dir`."""
        shutil.copytree(self.path, dest, dirs_exist_ok=True)
        (dest / TAGS_FILE).write_text(
            json.dumps({**self.tags, VERSION_KEY: self.version}, indent=2)
        )
        return dest


def _client(target: MlflowClient | Settings) -> MlflowClient:
    return registry.connect(target) if isinstance(target, Settings) else target


def version_for(target: MlflowClient | Settings, name: str, alias: str) -> ModelVersion:
    """The version `models:/<name>@<alias>` points at; AliasNotFoundError (a UserError) if none."""
    client = _client(target)
    mv = registry.version_by_alias(client, name, alias)
    if mv is None:
        raise AliasNotFoundError(
            f"models:/{name}@{alias} does not exist at MLFLOW_TRACKING_URI="
            f"{client.tracking_uri}: no version of {name!r} carries the alias {alias!r} yet; "
            "train and register one first (`make demo`, or `dvc repro`)."
        )
    return mv


def fetch(mv: ModelVersion, cache_dir: Path, *, alias: str | None = None) -> ServedModel:
    """A version already looked up, its files downloaded once under `cache_dir/name/version`
    and checked against its manifest (trust.check): UntrustedModelError if they differ, and
    the download is dropped, so a later attempt downloads it again.

    Files already in the cache that do not match (another store's version of the same name
    and number, after MLFLOW_TRACKING_URI changed) are dropped and downloaded once more;
    only a fresh download that still differs is refused.
    """
    name, version = str(mv.name), str(mv.version)
    tags = dict(mv.tags)
    cached = (cache_dir / name / version / "MLmodel").exists()
    for attempt in (1, 2):
        path = registry.download_version(cache_dir, name, version)
        try:
            trust.check(path, tags, f"models:/{name}/{version}")
        except trust.UntrustedModelError:
            shutil.rmtree(path, ignore_errors=True)
            if not cached or attempt == 2:
                raise
            continue
        break
    return ServedModel(name, version, alias, path, tags, "registry")


def resolve(target: MlflowClient | Settings, name: str, alias: str, cache_dir: Path) -> ServedModel:
    """`models:/<name>@<alias>`, downloaded; a missing alias is a AliasNotFoundError (UserError).

    `target` is a connected client, or the settings to connect with.
    """
    return fetch(version_for(target, name, alias), cache_dir, alias=alias)


def for_tenant(settings: Settings, tenant: str | None, cache_dir: Path) -> ServedModel:
    """What serves `tenant`: its own model's alias (`<MODEL_NAME>.<tenant>`) if set, else
    the shared model's (None: the shared one); a missing shared alias is a UserError."""
    client = _client(settings)
    alias = settings.model_alias
    own = None
    if tenant is not None:
        own = registry.version_by_alias(client, registry.model_name(settings, tenant), alias)
    mv = own or version_for(client, settings.model_name, alias)
    return fetch(mv, cache_dir, alias=alias)


def by_version(
    target: MlflowClient | Settings,
    name: str,
    version: str,
    cache_dir: Path,
    *,
    alias: str | None = None,
) -> ServedModel:
    """`models:/<name>/<version>`, downloaded; a missing version is a UserError."""
    client = _client(target)
    try:
        mv = client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            raise UserError(
                f"models:/{name}/{version} does not exist at MLFLOW_TRACKING_URI="
                f"{client.tracking_uri}: pick a registered version of {name!r}."
            ) from exc
        raise
    return fetch(mv, cache_dir, alias=alias)


def from_dir(path: Path, name: str, *, alias: str | None = None) -> ServedModel:
    """A model directory bundled by `ServedModel.bundle` (its tags in TAGS_FILE), checked
    against its manifest and the manifest SHA-256 the version was registered with."""
    tags_path = path / TAGS_FILE
    saved: dict[str, Any] = json.loads(tags_path.read_text()) if tags_path.exists() else {}
    tags = {str(k): str(v) for k, v in saved.items()}
    version = tags.get(VERSION_KEY, "bundled")
    trust.check(path, tags, f"the bundled {name} v{version} ({path})", ignore=BUNDLE_FILES)
    return ServedModel(name, version, alias, path, tags, "bundled")
