"""The workers past one machine, on a real PostgreSQL with the migrations applied.

KEDA's trigger (infra/kubernetes/worker/scaledobject.yaml) runs its query as the workers' role and
gets the messages of every request queue that role serves. A worker on a second "host" (a
network namespace of its own, joined to this one by a veth pair) drains a tenant's queue
through the database and MLflow listening on the host side of the pair.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import yaml

from common.localpg import LocalPostgres
from common.store import connect, jobs, migrate, roles, tenants
from tests.workspace import ROOT

pytestmark = pytest.mark.integration

RECORD = {"tenure_months": 3, "plan": "basic"}


def trigger_query() -> str:
    """The query of the ScaledObject's postgresql trigger, as KEDA sends it."""
    scaled = yaml.safe_load((ROOT / "infra/kubernetes/worker/scaledobject.yaml").read_text())
    (trigger,) = scaled["spec"]["triggers"]
    return str(trigger["metadata"]["query"])


@pytest.fixture
def db(postgres: LocalPostgres) -> dict[str, str]:
    """A migrated database with tenants a-1 and b, URLs per role."""
    postgres.start()
    name = f"keda_{uuid.uuid4().hex[:12]}"
    postgres.create_database(name)
    admin = postgres.url(name)
    migrate(admin)
    for role in roles.SERVICE_ROLES:
        roles.enable_login(admin, role)
    for tenant in ("a-1", "b"):
        tenants.add_tenant(admin, tenant)
    return {
        "admin": admin,
        "predictor": roles.role_url(admin, roles.PREDICTOR),
        "worker": roles.role_url(admin, roles.WORKER),
    }


def depth(url: str) -> Any:
    with connect(url) as conn:
        row = conn.execute(trigger_query()).fetchone()
    assert row is not None
    return row[0]


def test_the_keda_query_counts_every_served_request_queue_held_chunks_included(
    db: dict[str, str],
) -> None:
    assert depth(db["worker"]) == 0  # nothing queued: KEDA keeps zero replicas
    with connect(db["predictor"]) as conn:
        jobs.submit(conn, "a-1", [RECORD] * 25, chunk_records=10)  # 3 chunks
        jobs.submit(conn, "b", [RECORD] * 4, chunk_records=2)  # 2 chunks
    with connect(db["admin"]) as conn:
        # A request queue the workers are not granted is not theirs to count (nor an error).
        conn.execute("SELECT pgmq.create('jobs_req_other')")
        conn.execute("SELECT pgmq.send('jobs_req_other', '{}'::jsonb)")
    assert depth(db["worker"]) == 5
    with connect(db["worker"]) as conn:
        (held,) = jobs.read(conn, "a-1", visibility_timeout=30, limit=1)
        assert depth(db["worker"]) == 5  # a chunk a worker holds is still work to do
        jobs.dead_letter(conn, held, "test")  # acknowledged (into the dead-letter queue)
    assert depth(db["worker"]) == 4
    assert isinstance(depth(db["worker"]), int)  # KEDA scans it into a float64
