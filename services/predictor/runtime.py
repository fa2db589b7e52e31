"""The model the predictor serves, and how it follows the registry alias without downtime.

A poller thread reads `models:/<name>@<alias>`; when the alias moves, the new version is
loaded beside the old one, checked on its own input example, and swapped in with one
assignment, so a request sees either the old model or the new one, never a mix.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from common import registry
from common.registry import served
from common.registry.served import ServedModel
from common.settings import Settings

log = logging.getLogger("predictor")

WAKE_FILE = ".wake"
"""Touched by `wake` in the model cache: every worker of the service sharing it checks."""
WAKE_CHECK_SECONDS = 0.5
"""How often a worker looks at the wake file between polls (one stat call)."""


class ModelRuntime:
    """Holds the served model; a background thread follows the alias in the registry."""

    def __init__(self, settings: Settings, bundled_dir: Path | None = None) -> None:
        self.settings = settings
        self.name = settings.model_name
        self.alias = settings.model_alias
        self.cache = served.cache_dir(settings)
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

    def _initial(self) -> ServedModel:
        try:
            found = self._from_registry()
            if found is not None:
                return found
        except Exception as exc:  # any registry failure falls back to the bundle
            self._note_failure(exc)
        if self.bundled_dir is not None and (self.bundled_dir / "MLmodel").exists():
            bundled = served.from_dir(self.bundled_dir, self.name, alias=self.alias)
            log.warning("registry unavailable; serving the bundled model v%s", bundled.version)
            return bundled.load()
        raise RuntimeError(
            f"no model to serve: models:/{self.name}@{self.alias} is not reachable "
            f"({self.last_error or 'alias not set'}) and no bundled model is present"
        )

    def _registry(self) -> MlflowClient:
        if self._client is None:
            self._client = registry.connect(self.settings)
        return self._client

    def _from_registry(self, skip_version: str | None = None) -> ServedModel | None:
        client = self._registry()
        mv = registry.version_by_alias(client, self.name, self.alias)
        self.registry_ok, self.last_error = True, None
        self.last_check = datetime.now(UTC).isoformat(timespec="seconds")
        if mv is None or str(mv.version) == skip_version:
            return None
        return served.fetch(mv, self.cache, alias=self.alias).load()

    def _note_failure(self, exc: BaseException) -> None:
        self.registry_ok = False
        self.last_error = f"{type(exc).__name__}: {exc}"[:500]
        self.last_check = datetime.now(UTC).isoformat(timespec="seconds")
        current = getattr(self, "current", None)
        log.warning(
            "registry check failed; serving %s: %s",
            f"v{current.version}" if current else "nothing yet",
            self.last_error,
        )

    def check_now(self) -> bool:
        """Look at the alias once; swap if it moved. Returns whether a swap happened."""
        try:
            new = self._from_registry(skip_version=self.current.version)
        except Exception as exc:  # keep serving whatever goes wrong
            self._note_failure(exc)
            return False
        if new is None:
            return False
        old = self.current
        self.current = new
        self.swaps += 1
        log.info("swapped %s v%s -> v%s", self.name, old.version, new.version)
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
            "lineage": cur.lineage,
            "registry": {
                "reachable": self.registry_ok,
                "last_check": self.last_check,
                "last_error": self.last_error,
                "tracking_uri": self.settings.tracking_uri,
            },
            "swaps": self.swaps,
        }
