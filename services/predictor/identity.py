"""Who is calling: each request's API key, the tenant and scopes it grants, and MLflow's
signature on the registry webhook.

The guard (services.predictor.guard) asks `required_scopes` what a path needs, then
`authorize`s the request before BentoML reads its body; the API methods read the caller
with `current()`. A key is sent as `Authorization: Bearer <key>` or `X-API-Key: <key>`.

Keys are checked by PostgreSQL (`common.store.tenants.authenticate`, one call) and a valid
one is then cached in the worker for `ttl` seconds. A revocation, rotation or removal
NOTIFYs `KEYS_CHANNEL`: a listener thread on its own connection drops that key from the
cache at once, so every worker refuses a revoked key within a round trip. While the
listener is down nothing is served from the cache: every request asks PostgreSQL. When
PostgreSQL cannot be asked either, a key verified within `stale` seconds keeps working
(predictions are spilled and logged later, as without keys); any other key gets a 503.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolTimeout

from common.settings import Settings
from common.store.connection import connect
from common.store.tenants import KEYS_CHANNEL, Identity, authenticate, parse_key

log = logging.getLogger("predictor")

REALM = "predictor"
PUBLIC = frozenset(
    {"/", "/docs", "/docs.json", "/schema.json", "/livez", "/healthz", "/readyz", "/metrics"}
)
"""Health, metrics and the API's documentation (Swagger UI must load without a key)."""
PUBLIC_PREFIXES = ("/static_content/", "/assets/")
"""Swagger UI's own files."""
WEBHOOK = "/webhooks/mlflow"
SCOPES_BY_PATH: dict[str, frozenset[str]] = {
    "/predict": frozenset({"predict"}),
    "/feedback": frozenset({"feedback"}),
    # Reading back is part of either job: a client reads the answers it got, a labeller
    # the predictions it labels. `admin` alone (an operator's key) reads no tenant data.
    "/predictions": frozenset({"predict", "feedback"}),
    WEBHOOK: frozenset({"admin"}),
    "/model": frozenset({"admin"}),
    # Asynchronous jobs are predictions handed in now and collected later.
    "/jobs": frozenset({"predict"}),
    "/jobs/{job_id}": frozenset({"predict"}),
}
"""The scopes a route accepts (any one of them); `route` maps a path to its route."""

SIGNATURE_HEADER = "x-mlflow-signature"
TIMESTAMP_HEADER = "x-mlflow-timestamp"
DELIVERY_HEADER = "x-mlflow-delivery-id"
SIGNATURE_MAX_AGE = 300
"""Seconds a signed webhook stays valid (MLflow's documented replay window)."""

_CURRENT: ContextVar[Identity | None] = ContextVar("predictor_identity", default=None)


def required_scopes(path: str) -> frozenset[str] | None:
    """None for a public path; else the scopes that open it (empty: any valid key)."""
    if path in PUBLIC or path.startswith(PUBLIC_PREFIXES):
        return None
    return SCOPES_BY_PATH.get(route(path), frozenset())


def route(path: str) -> str:
    """The route of SCOPES_BY_PATH a path belongs to: /model/... is /model, /jobs/<id> is
    /jobs/{job_id}; any other path is itself."""
    if path.startswith("/model/"):
        return "/model"
    if path.startswith("/jobs/"):
        return "/jobs/{job_id}"
    return path


def current() -> Identity:
    """The identity the guard authorized for this request."""
    who = _CURRENT.get()
    if who is None:  # only a route the guard does not protect could get here
        raise RuntimeError("no authorized identity for this request")
    return who


class AccessError(Exception):
    """A request the guard answers itself: 401, 403 or 503, with the header to send."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str]) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers)


def _challenge(error: str | None = None, **params: str) -> dict[str, str]:
    """RFC 6750's WWW-Authenticate: the realm, and why the key was refused if one was sent."""
    value = f'Bearer realm="{REALM}"'
    if error is not None:
        value += f', error="{error}"'
    for name, param in params.items():
        value += f', {name}="{param}"'
    return {"www-authenticate": value}


def presented_key(headers: Mapping[str, str]) -> str:
    """The key a request carries (lower-case header names); a AccessError if none or unclear."""
    bearer: str | None = None
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AccessError(
                401,
                "the Authorization header must be 'Bearer <key>'",
                _challenge("invalid_request"),
            )
        bearer = token.strip()
    api_key = headers.get("x-api-key", "").strip() or None
    if bearer is not None and api_key is not None and bearer != api_key:
        raise AccessError(
            401, "Authorization and X-API-Key carry different keys", _challenge("invalid_request")
        )
    key = bearer or api_key
    if key is None:
        raise AccessError(
            401,
            "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            _challenge(),
        )
    return key


async def authorize(keys: Keys, headers: Mapping[str, str], needed: frozenset[str]) -> Identity:
    """Who the request's key speaks for, if it holds one of `needed`; else a AccessError."""
    key = presented_key(headers)
    who = keys.cached(key)
    if who is None:
        try:
            who = await asyncio.to_thread(keys.check, key)
        except KeysUnavailableError:
            raise AccessError(
                503,
                "the API key cannot be checked now: the key store is unreachable",
                {"retry-after": "5"},
            ) from None
    if who is None:
        raise AccessError(
            401,
            "invalid API key: unknown, malformed, expired or revoked",
            _challenge("invalid_token"),
        )
    if needed and not needed & who.scopes:
        wanted = " ".join(sorted(needed))
        raise AccessError(
            403,
            f"this key lacks the scope this operation needs ({' or '.join(sorted(needed))})",
            _challenge("insufficient_scope", scope=wanted),
        )
    return who


def as_caller(who: Identity) -> Any:
    """Make `who` the caller of this request (a ContextVar token for `forget`)."""
    return _CURRENT.set(who)


def forget(token: Any) -> None:
    _CURRENT.reset(token)


# -- the key cache -----------------------------------------------------------------------------


class KeysUnavailableError(Exception):
    """PostgreSQL cannot check a key, and no recent check of it is at hand."""


@dataclass(frozen=True)
class _Checked:
    identity: Identity
    digest: bytes
    at: float
    epoch: int


class Keys:
    """API key checks for one worker: PostgreSQL's answer, cached while revocations reach us."""

    def __init__(
        self,
        database_url: str,
        lookups: ConnectionPool[psycopg.Connection[Any]],
        *,
        ttl: float = 30.0,
        stale: float = 600.0,
        retry: float = 2.0,
        max_cached: int = 10_000,
    ) -> None:
        self.database_url = database_url
        self.lookups = lookups
        self.ttl = ttl
        self.stale = stale
        self.retry = retry
        self.max_cached = max_cached
        self._cache: dict[str, _Checked] = {}
        self._lock = threading.Lock()
        # Bumped whenever the listener connects or drops: a check from another epoch may
        # have missed a notification, so the cache does not answer for it.
        self._epoch = 0
        self._listening = False
        self._notified = 0
        self._retry_at = 0.0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def listening(self) -> bool:
        """Whether revocations reach this worker now (else every check asks PostgreSQL)."""
        return self._listening

    def start(self) -> None:
        """Start the revocation listener (in the worker process, after the fork)."""
        self._thread = threading.Thread(target=self._listen, name="api-key-listener", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def cached(self, key: str) -> Identity | None:
        """A recent check of `key` still vouched for by the listener; no I/O."""
        if not self._listening or self.ttl <= 0:
            return None
        parsed = parse_key(key)
        if parsed is None:
            return None
        entry = self._cache.get(parsed[0])
        if (
            entry is None
            or entry.epoch != self._epoch
            or time.monotonic() - entry.at > self.ttl
            or not hmac.compare_digest(entry.digest, _digest(key))
        ):
            return None
        return entry.identity

    def check(self, key: str) -> Identity | None:
        """PostgreSQL's answer for `key` (blocking); a KeysUnavailableError if it cannot answer."""
        parsed = parse_key(key)
        if parsed is None:
            return None
        key_id = parsed[0]
        digest = _digest(key)
        with self._lock:
            epoch, notified = self._epoch, self._notified
        started = time.monotonic()
        if started < self._retry_at:  # it failed a moment ago: do not wait on it again yet
            return self._recent(key_id, digest, started)
        try:
            who = authenticate(self.lookups, key)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            log.warning("API key check failed, PostgreSQL unreachable: %s", exc)
            self._retry_at = time.monotonic() + self.retry
            return self._recent(key_id, digest, started)
        with self._lock:
            entry = self._cache.get(key_id)
            if who is None:
                if entry is not None and hmac.compare_digest(entry.digest, digest):
                    del self._cache[key_id]
            elif notified == self._notified:  # no revocation arrived while we asked
                self._cache[key_id] = _Checked(who, digest, started, epoch)
                if len(self._cache) > self.max_cached:
                    self._prune(started)
        return who

    def _recent(self, key_id: str, digest: bytes, now: float) -> Identity:
        entry = self._cache.get(key_id)
        if (
            entry is not None
            and now - entry.at <= self.stale
            and hmac.compare_digest(entry.digest, digest)
        ):
            return entry.identity
        raise KeysUnavailableError(key_id)

    def _prune(self, now: float) -> None:
        """Keep the cache bounded: drop what even an outage would not use (lock held)."""
        self._cache = {k: v for k, v in self._cache.items() if now - v.at <= self.stale}
        if len(self._cache) > self.max_cached:
            self._cache.clear()

    def dropped(self, key_id: str) -> None:
        """A key was revoked, rotated out or removed: never answer for it from memory again."""
        with self._lock:
            self._notified += 1
            self._cache.pop(key_id, None)

    def _set_listening(self, up: bool) -> None:
        with self._lock:
            if up != self._listening:
                self._epoch += 1
                self._listening = up

    def _listen(self) -> None:
        delay = 0.5
        announced = False
        while not self._stopping.is_set():
            try:
                with connect(
                    self.database_url, statement_timeout=None, application_name="predictor-keys"
                ) as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(KEYS_CHANNEL)))
                    self._set_listening(True)
                    if announced:
                        log.info("API key revocations reach this worker again")
                    announced, delay = False, 0.5
                    while not self._stopping.is_set():
                        for note in conn.notifies(timeout=1.0):
                            self.dropped(note.payload)
            except psycopg.Error as exc:
                if not announced and not self._stopping.is_set():
                    log.warning("API key listener down, every key check asks PostgreSQL: %s", exc)
                    announced = True
            finally:
                self._set_listening(False)
            self._stopping.wait(delay)
            delay = min(delay * 2, 5.0)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


# -- the registry webhook ----------------------------------------------------------------------


def verify_signature(
    secret: str, headers: Mapping[str, str], body: bytes, now: float | None = None
) -> str | None:
    """None if MLflow signed this delivery with `secret`; else what is wrong with it.

    MLflow 3 (mlflow/webhooks/delivery.py) sends `X-MLflow-Signature: v1,<base64>`, the
    HMAC-SHA256 of `<X-MLflow-Delivery-Id>.<X-MLflow-Timestamp>.<body>`; a timestamp more
    than SIGNATURE_MAX_AGE seconds away from ours is refused, so a captured delivery
    cannot be replayed later.
    """
    signature = headers.get(SIGNATURE_HEADER)
    stamp = headers.get(TIMESTAMP_HEADER, "")
    delivery = headers.get(DELIVERY_HEADER)
    if not signature or not stamp or not delivery:
        return "a signed MLflow delivery is required (X-MLflow-Signature, -Timestamp, -Delivery-Id)"
    now = time.time() if now is None else now
    if not stamp.isdigit() or abs(now - int(stamp)) > SIGNATURE_MAX_AGE:
        return f"X-MLflow-Timestamp is not within {SIGNATURE_MAX_AGE} s of now"
    version, _, given = signature.partition(",")
    signed = f"{delivery}.{stamp}.".encode() + body
    expected = base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest())
    if version != "v1" or not hmac.compare_digest(expected, given.encode("latin-1")):
        return "X-MLflow-Signature does not match the body"
    return None


# -- what the service installs for the guard ---------------------------------------------------

ENVELOPE_BYTES = 4096
"""Room in a /predict body for what is not a record (the keys around the list)."""


def body_limits(settings: Settings) -> dict[str, int]:
    """The largest body each API route reads: /jobs its setting; /predict no more than a
    batch of PREDICT_MAX_BATCH records of PREDICT_MAX_RECORD_BYTES each can take, so a body
    that cannot be a valid batch gets its 413 before it is parsed."""
    batch = settings.predict_max_batch * settings.predict_max_record_bytes + ENVELOPE_BYTES
    return {"/jobs": settings.job_max_body_bytes, "/predict": batch}


@dataclass(frozen=True)
class Gate:
    """What the guard checks requests with in this worker."""

    keys: Keys
    webhook_secret: str | None = None
    body_limits: Mapping[str, int] = field(default_factory=dict)
    """Per API route, the largest body it reads (others: the guard's `max_body`)."""


class _Installed:
    """The gate of this worker; the service installs it once it is set up."""

    gate: Gate | None = None


def install(gate: Gate | None) -> None:
    """Called by the service once it is set up in this worker (None: uninstall)."""
    _Installed.gate = gate


def installed() -> Gate | None:
    return _Installed.gate
