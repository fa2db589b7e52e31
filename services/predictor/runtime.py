"""The model the predictor serves, and how it follows the registry alias without downtime.

A poller thread reads `models:/<name>@<alias>`; when the alias moves, the new version is
loaded beside the old one, checked on its own input example, and swapped in with one
assignment, so a request sees either the old model or the new one, never a mix.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from common import registry
from common.settings import Settings
from models.predict import Scorer, record_model

log = logging.getLogger("predictor")

WAKE_FILE = ".wake"
"""Touched by `wake` in the model cache: every worker of the service sharing it checks."""
WAKE_CHECK_SECONDS = 0.5
"""How often a worker looks at the wake file between polls (one stat call)."""

LINEAGE_TAGS = (
    "git.commit",
    "dvc.raw_md5",
    "dvc.train_md5",
    "metrics",
    "onnx.parity",
    "gate.decision",
    "gate.reason",
    "mlflow.run_id",
)


@dataclass(frozen=True)
class Served:
    """One loaded model version: what scores requests and what validates them."""

    name: str
    version: str
    scorer: Scorer
    record: type[BaseModel]
    tags: dict[str, str]
    source: str  # "registry" or "bundled"
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


def load_dir(name: str, version: str, model_dir: Path, tags: dict[str, str], source: str) -> Served:
    """Load and self-check a downloaded model directory."""
    scorer = Scorer.load(model_dir, prefer_onnx=tags.get("onnx.parity") == "passed")
    scorer.self_check()
    return Served(name, version, scorer, record_model(scorer), tags, source)


class ModelRuntime:
    """Holds the served model; a background thread follows the alias in the registry."""

    def __init__(self, settings: Settings, bundled_dir: Path | None = None) -> None:
        self.settings = settings
        self.name = settings.model_name
        self.alias = settings.model_alias
        self.cache = settings.mlops_home.resolve() / "served-models"
        self.bundled_dir = bundled_dir
        self.registry_ok = False
        self.last_error: str | None = None
        self.last_check: str | None = None
        self.swaps = 0
        self._client: MlflowClient | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.current = self._initial()

    def _initial(self) -> Served:
        try:
            served = self._from_registry()
            if served is not None:
                return served
        except Exception as exc:  # any registry failure falls back to the bundle
            self._note_failure(exc)
        if self.bundled_dir is not None and (self.bundled_dir / "MLmodel").exists():
            tags = _read_tags(self.bundled_dir)
            log.warning("registry unavailable; serving the bundled model v%s", tags.get("version"))
            return load_dir(
                self.name, tags.get("version", "bundled"), self.bundled_dir, tags, "bundled"
            )
        raise RuntimeError(
            f"no model to serve: models:/{self.name}@{self.alias} is not reachable "
            f"({self.last_error or 'alias not set'}) and no bundled model is present"
        )

    def _registry(self) -> MlflowClient:
        if self._client is None:
            self._client = registry.connect(self.settings)
        return self._client

    def _from_registry(self, skip_version: str | None = None) -> Served | None:
        client = self._registry()
        mv = registry.version_by_alias(client, self.name, self.alias)
        self.registry_ok, self.last_error = True, None
        self.last_check = datetime.now(UTC).isoformat(timespec="seconds")
        if mv is None or str(mv.version) == skip_version:
            return None
        version = str(mv.version)
        target = registry.download_version(self.cache, self.name, version)
        return load_dir(self.name, version, target, dict(mv.tags), "registry")

    def _note_failure(self, exc: BaseException) -> None:
        self.registry_ok = False
        self.last_error = f"{type(exc).__name__}: {exc}"[:500]
        self.last_check = datetime.now(UTC).isoformat(timespec="seconds")
        served = getattr(self, "current", None)
        log.warning(
            "registry check failed; serving %s: %s",
            f"v{served.version}" if served else "nothing yet",
            self.last_error,
        )

    def check_now(self) -> bool:
        """Look at the alias once; swap if it moved. Returns whether a swap happened."""
        try:
            served = self._from_registry(skip_version=self.current.version)
        except Exception as exc:  # keep serving whatever goes wrong
            self._note_failure(exc)
            return False
        if served is None:
            return False
        old = self.current
        self.current = served
        self.swaps += 1
        log.info("swapped %s v%s -> v%s", self.name, old.version, served.version)
        return True

    def wake(self) -> None:
        """Check the alias now, in every worker (a registry webhook reaches only one)."""
        self._wake.set()
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            (self.cache / WAKE_FILE).touch()
        except OSError as exc:  # this worker still checks; the others at their next poll
            log.warning("could not wake the other workers through %s: %s", self.cache, exc)

    def _woken_at(self) -> float:
        try:
            return (self.cache / WAKE_FILE).stat().st_mtime
        except OSError:
            return 0.0

    def start(self, on_check: Callable[[bool], None] | None = None) -> None:
        """Poll the alias every MODEL_POLL_SECONDS, and when woken; then `on_check(swapped)`."""

        def loop() -> None:
            seen = self._woken_at()
            due = time.monotonic() + self.settings.model_poll_seconds
            while not self._stop.is_set():
                self._wake.wait(min(WAKE_CHECK_SECONDS, max(due - time.monotonic(), 0)))
                if self._stop.is_set():
                    return
                woken = self._woken_at()
                if not self._wake.is_set() and woken == seen and time.monotonic() < due:
                    continue
                self._wake.clear()
                seen = woken
                due = time.monotonic() + self.settings.model_poll_seconds
                swapped = self.check_now()
                if on_check is not None:
                    on_check(swapped)

        self._thread = threading.Thread(target=loop, name="alias-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def describe(self) -> dict[str, Any]:
        """What /model answers: the version served, its lineage, and the registry's state."""
        cur = self.current
        return {
            "model_name": cur.name,
            "model_version": cur.version,
            "alias": self.alias,
            "source": cur.source,
            "backend": cur.scorer.backend,
            "loaded_at": cur.loaded_at,
            "lineage": {k: cur.tags[k] for k in LINEAGE_TAGS if k in cur.tags},
            "registry": {
                "reachable": self.registry_ok,
                "last_check": self.last_check,
                "last_error": self.last_error,
                "tracking_uri": self.settings.tracking_uri,
            },
            "swaps": self.swaps,
        }


TAGS_FILE = "registry_tags.json"
"""Written beside a bundled model: its registry tags and version, for /model when offline."""


def _read_tags(model_dir: Path) -> dict[str, str]:
    path = model_dir / TAGS_FILE
    return dict(json.loads(path.read_text())) if path.exists() else {}
