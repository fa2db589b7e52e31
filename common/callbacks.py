"""Job callbacks: the URL a tenant may name, and the signed POST sent when its job ends.

A callback URL must be http(s) and its host one of JOB_CALLBACK_HOSTS (exact host names or
addresses, comma-separated; empty refuses every callback), so a tenant cannot make the stack
call arbitrary addresses. The body is JSON; `X-MLOps-Signature: sha256=<hex>` is its
HMAC-SHA256 under JOB_CALLBACK_SECRET, and `X-MLOps-Timestamp` the Unix time it was sent,
also signed (`<timestamp>.<body>`), so a receiver can refuse replays. It has the shape of
GitHub's and Stripe's webhook signatures.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

SIGNATURE_HEADER = "X-MLOps-Signature"
TIMESTAMP_HEADER = "X-MLOps-Timestamp"
TIMEOUT = 5.0
"""Seconds a callback receiver has to answer."""


def allowed_hosts(setting: str) -> frozenset[str]:
    """JOB_CALLBACK_HOSTS as a set of lower-case host names."""
    return frozenset(h.strip().lower() for h in setting.split(",") if h.strip())


def check_url(url: str, hosts: Iterable[str]) -> str:
    """`url` if a callback may go there; a ValueError saying why not otherwise."""
    hosts = frozenset(hosts)
    if len(url) > 2048:
        raise ValueError("callback_url: longer than 2,048 characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"callback_url: {url!r} is not an http(s) URL")
    if parts.username or parts.password:
        raise ValueError("callback_url: credentials in the URL are not accepted")
    if not hosts:
        raise ValueError("callback_url: callbacks are off here (JOB_CALLBACK_HOSTS is empty)")
    if parts.hostname.lower() not in hosts:
        raise ValueError(
            f"callback_url: host {parts.hostname!r} is not allowed (JOB_CALLBACK_HOSTS)"
        )
    return url


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """The signature header's value for `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(body: bytes, secret: str, timestamp: str, signature: str) -> bool:
    """Whether `signature` is `body`'s at `timestamp` (what a receiver checks)."""
    try:
        expected = sign(body, secret, int(timestamp))
    except ValueError:
        return False
    return hmac.compare_digest(expected, signature)


def deliver(url: str, payload: Mapping[str, Any], secret: str | None) -> str:
    """POST `payload` to `url`, signed if `secret`; "delivered" or why it was not (no raise).

    Redirects are not followed: a redirect could lead off the allow-list.
    """
    body = json.dumps(payload, separators=(",", ":"), default=str).encode()
    now = int(time.time())
    headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: str(now)}
    if secret:
        headers[SIGNATURE_HEADER] = sign(body, secret, now)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=TIMEOUT) as response:
            return "delivered" if 200 <= response.status < 300 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"not delivered: {getattr(exc, 'reason', exc)}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None
