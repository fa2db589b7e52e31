"""What an autoscaler and a dashboard read of the workers, at /metrics (Prometheus).

Queue depth and the oldest message's age per tenant come from pgmq's own metrics, so every
worker reports the same figures for a queue (take the max across workers, not the sum).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, start_http_server

from common.store.jobs import QueueDepth

DEPTH = Gauge(
    "mlops_job_queue_depth",
    "Chunks in the tenant's request queue, visible or being scored",
    ["tenant"],
)
OLDEST = Gauge(
    "mlops_job_queue_oldest_age_seconds",
    "Age of the oldest chunk in the tenant's request queue (0 when empty)",
    ["tenant"],
)
CHUNKS = Counter(
    "mlops_job_chunks",
    "Chunks this worker handled, by outcome: done, retried (later) or dead (lettered)",
    ["tenant", "outcome"],
)


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Serve /metrics on `host`:`port` from a daemon thread."""
    start_http_server(port, addr=host)


def observe(depths: Iterable[QueueDepth], gone: Iterable[str] = ()) -> None:
    """Set the queue gauges; drop those of tenants no longer served."""
    for tenant in gone:
        for gauge in (DEPTH, OLDEST):
            with contextlib.suppress(KeyError):
                gauge.remove(tenant)
    for d in depths:
        DEPTH.labels(tenant=d.tenant_id).set(d.depth)
        OLDEST.labels(tenant=d.tenant_id).set(d.oldest_age_seconds)


def count(tenant: str, outcome: str, chunks: int = 1) -> None:
    CHUNKS.labels(tenant=tenant, outcome=outcome).inc(chunks)
