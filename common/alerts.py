"""Where a drift alert goes besides the flow's log, artifact and event: MONITOR_WEBHOOK_URL.

A paging or chat webhook gets the alert as one JSON POST. A webhook that fails is reported
back, not raised: the alert is in the other places anyway, and the monitor run's numbers
are already kept.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any


def post_webhook(url: str | None, payload: Mapping[str, Any], timeout: float = 10) -> str | None:
    """POST `payload` as JSON to `url` (nothing when unset); what went wrong, or None."""
    if not url:
        return None
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except (urllib.error.URLError, OSError) as exc:  # HTTPError (4xx, 5xx) is a URLError
        return f"webhook {url} failed: {exc}"
    return None
