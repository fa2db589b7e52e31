"""Suite-wide set-up: markers by folder, and a Prefect home per pytest-xdist worker.

tests/unit -> unit, tests/integration -> integration, tests/e2e -> e2e. Flows run
in-process against Prefect's ephemeral API, which keeps its state in a SQLite file under
PREFECT_HOME; workers sharing one file would lock each other out.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

KINDS = ("unit", "integration", "e2e")


def pytest_configure(config: pytest.Config) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    if "PREFECT_HOME" not in os.environ or worker != "main":
        os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix=f"prefect-home-{worker}-")
    # a fresh ephemeral server migrates its database first: give it time on a busy machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for kind in KINDS:
            if kind in parts:
                item.add_marker(getattr(pytest.mark, kind))
