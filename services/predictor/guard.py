"""ASGI guard in front of the API: the caller's key, then the body, before BentoML parses it.

Every path but health, metrics and the docs needs an API key holding the path's scope
(services.predictor.identity): 401 without a valid one, 403 without the scope, both with a
`WWW-Authenticate` header, before any of the body is read. Then it refuses non-JSON and
oversized bodies with a clear 4xx: without it BentoML answers a POST with a malformed
Content-Type (e.g. multipart without a boundary) with a 500, and reads a body of any size
into memory. The size limit is per route (the gate's `body_limits`, else `max_body`), and
holds for chunked bodies too: reading stops at the first byte over it. It also answers a
wrong method on BentoML's own routes with a 405 (BentoML routes them to its API app, which
404s), and serves /docs.json as `services.predictor.openapi.document` rewrites it.

Work per worker process is bounded: at most PREDICT_MAX_CONCURRENCY keyed requests in
flight, and at most PREDICT_MAX_INFLIGHT_BYTES of their bodies held at once (counted from
Content-Length before reading, else as chunks arrive, until the response is sent); over
either, a 503 with Retry-After, before any (more) of the body is read. A burst of large
bodies is refused, not buffered until the worker runs out of memory.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.settings import Settings, get_settings
from common.store.tenants import Identity
from services.predictor import identity
from services.predictor.openapi import ALLOWED, API_ROUTES, PUBLISHED, document

JSON_TYPES = ("application/json",)

RETRY_AFTER = [(b"retry-after", b"1")]
"""Seconds a caller refused for load should wait: requests in flight finish in about that."""


class _BusyError(Exception):
    """Over this worker's bound of bytes held: the request gets a 503."""


class RequestGuard:
    """The caller's key and scope first (401/403), then 415 for an API POST that is not
    JSON, 413 for a body over its route's limit (default `max_body` bytes), 405 for a
    method a BentoML route does not serve; /docs.json as the service really behaves.
    503 with Retry-After over the worker's bounds of requests and body bytes in flight."""

    def __init__(self, app: ASGIApp, max_body: int, settings: Settings | None = None) -> None:
        self.app = app
        self.max_body = max_body
        settings = settings or get_settings()
        self.max_in_flight = settings.predict_max_concurrency
        self.max_held = settings.predict_max_inflight_bytes
        self.in_flight = 0
        self.held = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        allowed = ALLOWED.get(path)
        needed = identity.required_scopes(path)
        if allowed is not None and scope["method"] not in allowed:
            allow = [(b"allow", ", ".join(allowed).encode())]
            await _reject(send, 405, f"{scope['method']} is not allowed here", allow)
        elif path == "/docs.json" and scope["method"] == "GET":
            await self._docs(scope, receive, send)
        elif needed is None:
            await self.app(scope, receive, send)
        elif self.in_flight >= self.max_in_flight:
            busy = f"{self.max_in_flight} requests are in flight in this worker: retry shortly"
            await _reject(send, 503, busy, RETRY_AFTER)
        else:
            self.in_flight += 1
            try:
                await self._private(scope, receive, send, needed)
            finally:
                self.in_flight -= 1

    async def _private(
        self, scope: Scope, receive: Receive, send: Send, needed: frozenset[str]
    ) -> None:
        """A path that needs a key (or, for the registry webhook, MLflow's signature)."""
        headers = _headers(scope)
        gate = identity.installed()
        if gate is None:
            await _reject(send, 503, "the service is still starting", [(b"retry-after", b"1")])
            return
        api_post = scope["method"] == "POST" and scope["path"] in API_ROUTES
        if scope["path"] == identity.WEBHOOK and gate.webhook_secret and api_post:
            await self._signed_webhook(scope, receive, send, headers, gate.webhook_secret)
            return
        try:
            who = await self._identify(gate, headers, needed)
        except identity.AccessError as refusal:
            extra = [(k.encode(), v.encode()) for k, v in refusal.headers.items()]
            await _reject(send, refusal.status, refusal.message, extra)
            return
        token = identity.as_caller(who)
        try:
            if api_post:
                # a body the worker could never hold is a 413, not a 503 forever
                limit = min(gate.body_limits.get(scope["path"], self.max_body), self.max_held)
                await self._with_body(scope, receive, send, headers, limit)
            else:
                await self.app(scope, receive, send)
        finally:
            identity.forget(token)

    async def _with_body(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], limit: int
    ) -> None:
        """Read the body within this worker's bound of bytes held, then pass it on; the
        bytes count as held until the app has answered."""
        counted = [0]
        try:
            body = await self._read_body(scope, receive, send, headers, limit, counted=counted)
            if body is not None:
                await self.app(scope, _replay(body, receive), send)
        except _BusyError:
            busy = f"this worker holds {self.max_held:,} bytes of request bodies: retry shortly"
            await _reject(send, 503, busy, RETRY_AFTER)
        finally:
            self.held -= counted[0]

    def _hold(self, counted: list[int], size: int) -> None:
        """Count `size` more bytes of this request's body as held (_BusyError: over the bound)."""
        if self.held + size > self.max_held:
            raise _BusyError
        self.held += size
        counted[0] += size

    async def _identify(
        self, gate: identity.Gate, headers: dict[str, str], needed: frozenset[str]
    ) -> Identity:
        """Who the request's key speaks for (a AccessError if it may not come in)."""
        return await identity.authorize(gate.keys, headers, needed)

    async def _signed_webhook(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], secret: str
    ) -> None:
        """With a webhook secret set, MLflow's signature is the credential (it sends no key)."""
        counted = [0]
        try:
            limit = min(self.max_body, self.max_held)
            body = await self._read_body(scope, receive, send, headers, limit, counted=counted)
            if body is not None:
                await self._verified(scope, receive, send, headers, secret=secret, body=body)
        except _BusyError:
            busy = f"this worker holds {self.max_held:,} bytes of request bodies: retry shortly"
            await _reject(send, 503, busy, RETRY_AFTER)
        finally:
            self.held -= counted[0]

    async def _verified(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[str, str],
        *,
        secret: str,
        body: bytes,
    ) -> None:
        """Pass a webhook on if its signature is MLflow's, else 401."""
        problem = identity.verify_signature(secret, headers, body)
        if problem is not None:
            challenge = [
                (b"www-authenticate", f'MLflow-Signature realm="{identity.REALM}"'.encode())
            ]
            await _reject(send, 401, problem, challenge)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[str, str],
        limit: int,
        *,
        counted: list[int],
    ) -> bytes | None:
        """An API POST's body: JSON only, read whole up to `limit` bytes (None: refused),
        its bytes counted as held in `counted` (_BusyError: over the worker's bound)."""
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if media not in JSON_TYPES:
            shown = media or "none"
            await _reject(send, 415, f"Content-Type must be application/json, got {shown}")
            return None
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _reject(send, 413, _too_big(int(declared), limit))
            return None
        if declared.isdigit():
            self._hold(counted, int(declared))
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            if len(body) + len(chunk) > counted[0]:
                self._hold(counted, len(body) + len(chunk) - counted[0])
            body += chunk
            more = message.get("more_body", False)
            if len(body) > limit:
                await _reject(send, 413, _too_big(None, limit))
                return None
        return bytes(body)

    async def _docs(self, scope: Scope, receive: Receive, send: Send) -> None:
        """BentoML's generated document, rewritten to what the service accepts and sends."""
        status = 500
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        if status != 200:
            await _reject(send, status, "the OpenAPI document could not be generated")
            return
        gate = identity.installed()
        signed = gate is not None and bool(gate.webhook_secret)
        spec = document(json.loads(b"".join(chunks)), PUBLISHED.get(), signed_webhook=signed)
        await _send_json(send, 200, spec)


def _too_big(size: int | None, limit: int) -> str:
    """The 413's message; `size` None: a streamed body, refused before its end."""
    said = "request body" if size is None else f"request body of {size:,} bytes"
    return f"{said} is over the limit of {limit:,} bytes"


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body already read, then the real channel."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _reject(
    send: Send, status: int, error: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await _send_json(send, status, {"error": error}, headers)


async def _send_json(
    send: Send, status: int, payload: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
