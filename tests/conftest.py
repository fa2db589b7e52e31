"""Suite-wide set-up: markers by folder, a Prefect home per pytest-xdist worker, no user state.

tests/unit -> unit, tests/integration -> integration, tests/e2e -> e2e. Flows run
in-process against Prefect's ephemeral API, which keeps its state in a SQLite file under
PREFECT_HOME; workers sharing one file would lock each other out. A user's own settings
(MLFLOW_TRACKING_URI, DATABASE_URL, MLOPS_HOME, ...) are dropped, MLOPS_HOME is a fresh
directory (no test reads the checkout's .mlops/ or writes into it), and MLOPS_ENV_FILE reads
no dotenv file: a `.env` the user keeps in the checkout reaches no test, nor the processes
the tests start.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# MLflow's telemetry thread sets and unsets _MLFLOW_TELEMETRY_SESSION_ID in os.environ while
# other threads iterate it (requests reads the proxies from it): KeyError mid-request. No
# telemetry leaves this machine anyway; the servers and commands the tests start inherit this.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from common.settings import ENV_FILE
from tests.workspace import USER_VARIABLES

KINDS = ("unit", "integration", "e2e")
ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    if "PREFECT_HOME" not in os.environ or worker != "main":
        os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix=f"prefect-home-{worker}-")
    for name in USER_VARIABLES:
        os.environ.pop(name, None)
    home = Path(tempfile.mkdtemp(prefix=f"mlops-home-{worker}-"))
    home.chmod(0o755)  # an embedded PostgreSQL runs as `postgres` when we are root
    os.environ["MLOPS_HOME"] = str(home)
    os.environ[ENV_FILE] = os.devnull
    # a fresh ephemeral server migrates its database first: give it time on a busy machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


LONGEST_FIRST = (
    "tests/e2e/test_loop.py",
    "tests/integration/test_stack.py",
    "tests/e2e/test_tenant_pipeline.py",
    "tests/integration/test_pipeline_registry_switch.py",
    "tests/integration/test_monitor_flow.py",
    "tests/e2e/test_byod.py",
    "tests/integration/test_bad_input.py",
    "tests/e2e/test_pipeline.py",
)
"""The files that take longest (minutes each, `make test`'s slowest durations), started first.
pytest-xdist hands whole files to workers in collection order (`--no-loadscope-reorder`, set
by `make test`; its default starts the files with the most tests first, which left these to
the end and the run waiting on them)."""


def _first(item: pytest.Item) -> int:
    path = Path(str(item.fspath)).resolve()
    for rank, name in enumerate(LONGEST_FIRST):
        if path == ROOT / name:
            return rank
    return len(LONGEST_FIRST)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for kind in KINDS:
            if kind in parts:
                item.add_marker(getattr(pytest.mark, kind))
    items.sort(key=_first)  # stable: within a file, and among the rest, the order is kept
