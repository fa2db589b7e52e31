"""The drift alert's webhook: one JSON POST, and a failing webhook reported, never raised."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from common.alerts import post_webhook
from tests.servers import free_port


class _Hook(BaseHTTPRequestHandler):
    bodies: ClassVar[list[Any]] = []
    status: ClassVar[int] = 200

    def do_POST(self) -> None:
        length = int(self.headers["content-length"])
        type(self).bodies.append(
            (self.headers["content-type"], json.loads(self.rfile.read(length)))
        )
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[tuple[str, type[_Hook]]]:
    handler = type("Hook", (_Hook,), {"bodies": [], "status": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/alerts", handler
    server.shutdown()
    server.server_close()


def test_posts_the_payload_as_json(hook: tuple[str, type[_Hook]]) -> None:
    url, handler = hook

    assert post_webhook(url, {"event": "mlops.drift.detected", "share_drifted": 0.21}) is None

    assert handler.bodies == [
        ("application/json", {"event": "mlops.drift.detected", "share_drifted": 0.21})
    ]


def test_no_url_posts_nothing() -> None:
    assert post_webhook(None, {"event": "x"}) is None
    assert post_webhook("", {"event": "x"}) is None


def test_a_webhook_answering_an_error_is_reported_not_raised(
    hook: tuple[str, type[_Hook]],
) -> None:
    url, handler = hook
    handler.status = 500

    failure = post_webhook(url, {"event": "x"})

    assert failure is not None
    assert failure.startswith(f"webhook {url} failed: ")
    assert "500" in failure


def test_an_unreachable_webhook_is_reported_not_raised() -> None:
    url = f"http://127.0.0.1:{free_port()}/alerts"

    failure = post_webhook(url, {"event": "x"}, timeout=2)

    assert failure is not None
    assert failure.startswith(f"webhook {url} failed: ")
