"""The one health probe the launchers and tests wait on: does GET `url` answer 2xx?"""

from __future__ import annotations

import urllib.error
import urllib.request


def http_ok(url: str, timeout: float = 2) -> bool:
    """Whether GET `url` answers 2xx within `timeout` seconds (any failure: no)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= int(resp.status) < 300
    except (urllib.error.URLError, OSError):
        return False
