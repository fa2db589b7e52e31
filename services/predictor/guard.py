"""ASGI guard in front of the API: refuse non-JSON and oversized bodies with a clear 4xx.

Without it BentoML answers a POST with a malformed Content-Type (e.g. multipart without a
boundary) with a 500, and reads a body of any size into memory. It also answers a wrong
method on BentoML's own routes with a 405 (BentoML routes them to its API app, which 404s),
and serves /docs.json as `services.predictor.openapi.document` rewrites it.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.predictor.openapi import ALLOWED, API_ROUTES, PUBLISHED, document

JSON_TYPES = ("application/json",)


class RequestGuard:
    """415 for an API POST that is not JSON, 413 for a body over `max_body` bytes, 405 for a
    method a BentoML route does not serve; /docs.json as the service really behaves."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        allowed = ALLOWED.get(scope["path"])
        if allowed is not None and scope["method"] not in allowed:
            allow = [(b"allow", ", ".join(allowed).encode())]
            await _reject(send, 405, f"{scope['method']} is not allowed here", allow)
        elif scope["path"] == "/docs.json" and scope["method"] == "GET":
            await self._docs(scope, receive, send)
        elif scope["method"] != "POST" or scope["path"] not in API_ROUTES:
            await self.app(scope, receive, send)
        else:
            await self._api_post(scope, receive, send)

    async def _api_post(self, scope: Scope, receive: Receive, send: Send) -> None:
        """An API POST: JSON only, read whole up to `max_body`, then replayed to the app."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if media not in JSON_TYPES:
            shown = media or "none"
            await _reject(send, 415, f"Content-Type must be application/json, got {shown}")
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            await _reject(send, 413, self._too_big(int(declared)))
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                await _reject(send, 413, self._too_big(len(body)))
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    def _too_big(self, size: int) -> str:
        return f"request body of {size:,} bytes is over the limit of {self.max_body:,} bytes"

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
        spec = document(json.loads(b"".join(chunks)), PUBLISHED.get())
        await _send_json(send, 200, spec)


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
