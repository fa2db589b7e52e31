"""The models the predictor and the job workers serve, each following its registry alias live.

The shared model (`models:/<MODEL_NAME>@<alias>`) is loaded at start; a tenant's own model
(`<MODEL_NAME>.<tenant>`, `common.registry.model_name`) on its first request, and kept in
a bounded cache, the least recently used dropped first (MODEL_CACHE_SIZE). A tenant with
no model of its own is served the shared one. A poller thread reads every alias in one
registry search; when one moves, the new version is loaded beside the old one, checked on
its own input example, and swapped in with one assignment, so a request sees either the
old model or the new one, never a mix, and other tenants' models are not touched.

Variants (`common.registry.variants`): the same search gives each registered model's
`challenger` and `shadow` aliases and its `rollout.challenger_weight` tag. The shared
model's variants and those of each cached tenant model are loaded (checked the same way)
before they serve, swapped with one assignment, and dropped when their alias goes. A
tenant with a model of its own is served its own model's variants; every other tenant the
shared model's. `choose` picks, per request, the variant of an entity key.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from common import registry
from common.registry import served, trust, variants
from common.registry.served import ServedModel
from common.registry.variants import SHADOW, Variant
from common.settings import Settings

log = logging.getLogger("predictor")

WAKE_FILE = ".wake"
"""Touched by `wake` in the model cache: every worker of the service sharing it checks."""
WAKE_CHECK_SECONDS = 0.5
"""How often a worker looks at the wake file between polls (one stat call)."""


class ModelUnavailableError(Exception):
    """A tenant's own model could not be loaded now (registry or artifact store away)."""


@dataclass(frozen=True)
class Variants:
    """A registered model's challenger and shadow, loaded, and the challenger's share (%)."""

    challenger: ServedModel | None = None
    shadow: ServedModel | None = None
    weight: float = 0.0


NO_VARIANTS = Variants()


@dataclass(frozen=True)
class Choice:
    """Who answers one request: `model` (the `variant`'s), the `champion` to fall back on
    if it fails, and the `shadow` scored on a copy afterwards (None: no shadow)."""

    variant: Variant
    model: ServedModel
    champion: ServedModel
    shadow: ServedModel | None


class ModelCache:
    """Tenants' own loaded models, at most `size`; past it the least recently used goes.

    Thread-safe: requests read it, the poller and first requests write it. A model
    dropped here stays alive for requests still holding it.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.evictions = 0
        self._models: OrderedDict[str, ServedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, tenant: str) -> ServedModel | None:
        """The tenant's model, now the most recently used; None if not loaded."""
        with self._lock:
            model = self._models.get(tenant)
            if model is not None:
                self._models.move_to_end(tenant)
            return model

    def peek(self, tenant: str) -> ServedModel | None:
        """The tenant's model without counting as a use."""
        return self._models.get(tenant)

    def put(self, tenant: str, model: ServedModel) -> list[str]:
        """Add or replace as the most recently used; the tenants evicted to make room."""
        with self._lock:
            self._models[tenant] = model
            self._models.move_to_end(tenant)
            evicted = []
            while len(self._models) > self.size:
                gone, _ = self._models.popitem(last=False)
                evicted.append(gone)
            self.evictions += len(evicted)
            return evicted

    def replace(self, tenant: str, old: ServedModel, new: ServedModel) -> bool:
        """Swap `old` for `new` in place (its recency kept), if `old` is still the entry."""
        with self._lock:
            if self._models.get(tenant) is not old:
                return False
            self._models[tenant] = new
            return True

    def discard(self, tenant: str, old: ServedModel) -> None:
        """Drop the tenant's entry if it is still `old`."""
        with self._lock:
            if self._models.get(tenant) is old:
                del self._models[tenant]

    def items(self) -> list[tuple[str, ServedModel]]:
        """A snapshot, least recently used first."""
        with self._lock:
            return list(self._models.items())

    def __len__(self) -> int:
        return len(self._models)


REGISTRY_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
"""MLflow's retry settings for the serving processes' registry calls, unless set."""


class ModelRuntime:
    """Holds the served models; a background thread follows their aliases in the registry."""

    def __init__(
        self, settings: Settings, bundled_dir: Path | None = None, *, follow_variants: bool = True
    ) -> None:
        self.settings = settings
        # The poll is the retry: a check that cannot reach the registry or its artifacts
        # fails in seconds and runs again MODEL_POLL_SECONDS later. MLflow's defaults (7
        # retries, backoff factor 2) held a check for minutes after S3 came back. The
        # user's own values win.
        for name, value in REGISTRY_RETRIES.items():
            os.environ.setdefault(name, value)
        self.name = settings.model_name
        self.alias = settings.model_alias
        self.cache = served.cache_dir(settings)
        self.bundled_dir = bundled_dir
        self.registry_ok = False
        self.last_error: str | None = None
        self.last_check: str | None = None
        self.swaps = 0
        self.loads = 0
        self.refused: dict[str, str] = {}
        """`models:/<name>/<version>` -> why it was refused (trust.check): never loaded, not
        tried again; whatever served before keeps serving."""
        self.own: dict[str, str] = {}
        """Tenant -> the version its own model's alias pointed at in the last check."""
        self.follow_variants = follow_variants
        self.states: dict[str, registry.ModelState] = {}
        """Registered name -> its aliases and tags in the last check."""
        self.variants: dict[str, Variants] = {}
        """Registered name -> its loaded variants: the shared model and cached tenants'."""
        self.models = ModelCache(settings.model_cache_size)
        self._client: MlflowClient | None = None
        self._loading: dict[str, threading.Lock] = {}
        self._loading_guard = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.current = self._initial()
        self._sync_variants(self.name)

    def _initial(self) -> ServedModel:
        try:
            version = self._versions().get(self.name)
            if version is not None:
                return self._fetch(self.name, version)
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

    def _versions(self) -> dict[str, str]:
        """Every alias and tag in one registry search; notes the tenants that have models of
        their own. Registered name -> the version of the served alias."""
        states = registry.model_states(self._registry(), self.name)
        versions = {
            name: state.aliases[self.alias]
            for name, state in states.items()
            if self.alias in state.aliases
        }
        self.states = states
        self.registry_ok, self.last_error = True, None
        self.last_check = datetime.now(UTC).isoformat(timespec="seconds")
        own = {}
        for name, version in versions.items():
            tenant = registry.tenant_of(self.settings, name)
            if tenant is not None:
                own[tenant] = version
        self.own = own  # one assignment: requests see the old map or the new one
        return versions

    def _fetch(self, name: str, version: str, alias: str | None = None) -> ServedModel:
        """Download and load one version (its files checked against its manifest, then on its
        input example) before it serves; a refused version is not tried again."""
        uri = f"models:/{name}/{version}"
        if uri in self.refused:
            raise trust.UntrustedModelError(self.refused[uri])
        try:
            return served.by_version(
                self._registry(), name, version, self.cache, alias=alias or self.alias
            ).load()
        except trust.UntrustedModelError as exc:
            self.refused[uri] = str(exc)[:500]
            log.error("refused %s, not loaded: %s", uri, exc)
            raise

    def _sync_variants(self, name: str) -> bool:
        """Load `name`'s challenger and shadow as the last check saw them; swap in one
        assignment. A version that fails to load keeps the one before it (retried at the
        next check); an alias gone drops its model at once. Whether anything changed."""
        if not self.follow_variants:
            return False
        state = self.states.get(name)
        aliases = state.aliases if state is not None else {}
        old = self.variants.get(name, NO_VARIANTS)
        loaded: dict[str, ServedModel | None] = {}
        for alias, have in ((registry.CHALLENGER, old.challenger), (SHADOW, old.shadow)):
            wanted = aliases.get(alias)
            if wanted is None or (have is not None and have.version == wanted):
                loaded[alias] = None if wanted is None else have
                continue
            try:
                loaded[alias] = self._fetch(name, wanted, alias)
                log.info("loaded %s v%s as %s", name, wanted, alias)
            except Exception as exc:  # not served until it loads; retried next check
                self._note_failure(exc)
                loaded[alias] = have
        new = Variants(
            loaded[registry.CHALLENGER],
            loaded[SHADOW],
            variants.weight_of(state.tags) if state is not None else 0.0,
        )
        if new == old:
            return False
        if new == NO_VARIANTS:
            self.variants.pop(name, None)
        else:
            self.variants[name] = new  # one assignment: a request sees old or new
        return (new.challenger, new.shadow) != (old.challenger, old.shadow)

    def choose(self, tenant: str, key: str, champion: ServedModel) -> Choice:
        """Who answers `tenant`'s request with entity `key`: `champion` (`ready` or `load`'s
        answer) or its registered model's challenger, by `variants.assign`; and its shadow.
        No I/O."""
        found = self.variants.get(champion.name, NO_VARIANTS)
        if found.challenger is not None and variants.assign(tenant, key, found.weight) == (
            "challenger"
        ):
            return Choice("challenger", found.challenger, champion, found.shadow)
        return Choice("champion", champion, champion, found.shadow)

    def select(self, tenant: str, key: str) -> Choice:
        """`choose` on `serving(tenant)`: blocks on a tenant model's first use."""
        return self.choose(tenant, key, self.serving(tenant))

    def _note_failure(self, exc: BaseException) -> None:
        if isinstance(exc, trust.UntrustedModelError):  # the registry answered; _fetch logged it
            self.last_error = f"{type(exc).__name__}: {exc}"[:500]
            return
        self.registry_ok = False
        self.last_error = f"{type(exc).__name__}: {exc}"[:500]
        self.last_check = datetime.now(UTC).isoformat(timespec="seconds")
        current = getattr(self, "current", None)
        log.warning(
            "registry check failed; serving %s: %s",
            f"v{current.version}" if current else "nothing yet",
            self.last_error,
        )

    def ready(self, tenant: str) -> ServedModel | None:
        """The model answering `tenant` now, without I/O; None if its own must be loaded."""
        model = self.models.get(tenant)
        if model is not None:
            return model
        return None if tenant in self.own else self.current

    def load(self, tenant: str) -> ServedModel:
        """`tenant`'s model, loading its own on first use (once however many wait; blocks).

        ModelUnavailableError if it cannot be loaded now.
        """
        with self._loading_guard:
            lock = self._loading.setdefault(tenant, threading.Lock())
        with lock:
            while True:
                model = self.ready(tenant)
                version = self.own.get(tenant)
                if model is not None or version is None:
                    return model or self.current
                name = registry.model_name(self.settings, tenant)
                try:
                    model = self._fetch(name, version)
                except Exception as exc:
                    raise ModelUnavailableError(
                        f"{name} v{version} cannot be loaded now: {type(exc).__name__}: {exc}"
                    ) from exc
                if self.own.get(tenant) != version:
                    continue  # the alias moved while loading: load what it points at now
                evicted = self.models.put(tenant, model)
                self.loads += 1
                self._sync_variants(name)
                for gone in evicted:
                    self.variants.pop(registry.model_name(self.settings, gone), None)
                log.info("loaded %s v%s; evicted %s", name, version, evicted or "none")
                return model

    def serving(self, tenant: str) -> ServedModel:
        """`ready`, else `load`: what answers `tenant` (blocking on a first use)."""
        return self.ready(tenant) or self.load(tenant)

    def check_now(self) -> bool:
        """Look at every alias once; swap the models whose alias moved. Whether one did."""
        try:
            versions = self._versions()
        except Exception as exc:  # keep serving whatever goes wrong
            self._note_failure(exc)
            return False
        swapped = self._swap_shared(versions.get(self.name))
        swapped = self._swap_tenants() or swapped
        followed = {self.name} | {model.name for _, model in self.models.items()}
        for name in followed:
            swapped = self._sync_variants(name) or swapped
        for name in set(self.variants) - followed:  # evicted tenants' models
            self.variants.pop(name, None)
        return swapped

    def _swap_shared(self, shared: str | None) -> bool:
        """Load the shared champion's new version and swap it in; whether it was."""
        swapped = False
        if shared is not None and shared != self.current.version:
            try:
                new = self._fetch(self.name, shared)
            except Exception as exc:
                self._note_failure(exc)
            else:
                old, self.current = self.current, new
                self.swaps += 1
                swapped = True
                log.info("swapped %s v%s -> v%s", self.name, old.version, new.version)
        return swapped

    def _swap_tenants(self) -> bool:
        """The cached tenants' champions: swapped to their alias's version, or dropped when
        their own alias is gone (the shared model answers them); whether any was."""
        swapped = False
        for tenant, model in self.models.items():
            wanted = self.own.get(tenant)
            if wanted is None:  # its own model is gone: the shared one answers
                self.models.discard(tenant, model)
                swapped = True
            elif wanted != model.version:
                try:
                    new = self._fetch(model.name, wanted)
                except Exception as exc:  # keep its current version, retry next check
                    self._note_failure(exc)
                    continue
                if self.models.replace(tenant, model, new):
                    self.swaps += 1
                    swapped = True
                    log.info("swapped %s v%s -> v%s", model.name, model.version, new.version)
        return swapped

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

    def describe(self, tenant: str | None = None) -> dict[str, Any]:
        """What /model answers: the model that serves `tenant` (None: the shared one), its
        lineage, the registry's state, and the cache's counts (never other tenants' ids)."""
        own = tenant is not None and tenant in self.own
        cur = self.models.peek(tenant) if tenant is not None else None
        if cur is None and not own:
            cur = self.current
        about: dict[str, Any] = (
            {
                "model_name": cur.name,
                "model_version": cur.version,
                "alias": self.alias,
                "source": cur.source,
                "backend": cur.scorer.backend,
                "loaded_at": cur.loaded_at,
                "lineage": cur.lineage,
            }
            if cur is not None
            else {  # its own model, not loaded yet: its first request loads it
                "model_name": registry.model_name(self.settings, tenant),
                "model_version": self.own.get(tenant or ""),
                "alias": self.alias,
                "source": "registry",
                "loaded_at": None,
            }
        )
        name = str(about["model_name"])
        found = self.variants.get(name, NO_VARIANTS)
        aliases = self.states[name].aliases if name in self.states else {}

        def variant(model: ServedModel | None, alias: str) -> dict[str, Any] | None:
            if model is None and alias not in aliases:
                return None
            return {  # an alias whose version is not loaded (yet) is not serving
                "model_version": model.version if model is not None else aliases[alias],
                "alias_version": aliases.get(alias),
                "serving": model is not None,
            }

        return {
            **about,
            **({"tenant_id": tenant, "own_model": own} if tenant is not None else {}),
            "variants": {
                "champion": {"model_version": about["model_version"], "serving": True},
                "challenger": variant(found.challenger, registry.CHALLENGER),
                "shadow": variant(found.shadow, SHADOW),
                "challenger_weight": variants.weight_of(self.states[name].tags)
                if name in self.states
                else found.weight,
            },
            "registry": {
                "reachable": self.registry_ok,
                "last_check": self.last_check,
                "last_error": self.last_error,
                "tracking_uri": self.settings.tracking_uri,
            },
            "swaps": self.swaps,
            # this model's refused versions only: other tenants' model names carry their ids
            "refused": {
                uri: why for uri, why in self.refused.items() if uri.startswith(f"models:/{name}/")
            },
            "cache": {
                "tenant_models_loaded": len(self.models),
                "size": self.models.size,
                "loads": self.loads,
                "evictions": self.models.evictions,
            },
        }
