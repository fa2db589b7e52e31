"""Per-variant live numbers of one registered model: what the rollout flow compares.

Over a window of the prediction log, for each variant (champion, challenger) and the
version it is under: requests logged (in the window and since the current step began),
requests it failed to score (`serving_errors`), latency p50/p95, and the labelled requests
(labels from `feedback`): how many were predicted right, and per request whether the label
is the positive class and the logged probability of that class (the ROC AUC's inputs).
The positive class is the greater of a binary model's two class names (the last of the
sorted names, as the monitor's reference picks it); a multiclass model's rows give no AUC
inputs.

Two queries in one transaction scoped to the tenants (row-level security), the same way
the monitor reads its window: one for the counts, latencies and errors, one for the
labelled requests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from psycopg import sql

from common.store.connection import connect
from common.store.migrations import migrate
from common.store.tenants import scope, tenant_ids


@dataclass(frozen=True)
class VariantNumbers:
    """One variant's live numbers over the window (models.rollout.LiveNumbers)."""

    variant: str
    version: str
    requests: int = 0
    step_requests: int = 0
    errors: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    labelled: int = 0
    correct: int = 0
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int8), repr=False)
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @property
    def error_rate(self) -> float | None:
        attempts = self.requests + self.errors
        return self.errors / attempts if attempts else None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def summary(self) -> dict[str, Any]:
        """The numbers as JSON-ready values (the evidence a promotion records)."""
        return {
            "variant": self.variant,
            "version": self.version,
            "requests": self.requests,
            "step_requests": self.step_requests,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "latency_p50_ms": self.latency_p50_ms,
            "latency_p95_ms": self.latency_p95_ms,
            "labelled": self.labelled,
            "accuracy": self.accuracy,
        }


_WANTED = sql.SQL(
    "wanted(variant, model_version) AS (SELECT * FROM unnest({}::text[], {}::text[]))"
)

_COUNTS = """
WITH {wanted},
pred AS (
    SELECT p.variant,
           count(*) AS requests,
           count(*) FILTER (WHERE p.ts >= {step_start}) AS step_requests,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY p.latency_ms) AS p50,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY p.latency_ms) AS p95
    FROM predictions p
    JOIN wanted w ON w.variant = p.variant AND w.model_version = p.model_version
    WHERE p.model_name = {name} AND p.ts >= {start} AND p.ts < {end} AND {own}
    GROUP BY p.variant
),
err AS (
    SELECT e.variant, count(*) AS errors
    FROM serving_errors e
    JOIN wanted w ON w.variant = e.variant AND w.model_version = e.model_version
    WHERE e.model_name = {name} AND e.ts >= {start} AND e.ts < {end} AND {own_errors}
    GROUP BY e.variant
)
SELECT w.variant, coalesce(pred.requests, 0), coalesce(pred.step_requests, 0),
       coalesce(err.errors, 0), pred.p50, pred.p95
FROM wanted w LEFT JOIN pred USING (variant) LEFT JOIN err USING (variant)
"""

_LABELLED = """
WITH {wanted}
SELECT p.variant,
       f.label = p.predicted,
       CASE WHEN k.classes = 2 THEN f.label = k.positive END,
       CASE WHEN k.classes = 2 THEN (p.probabilities ->> k.positive)::float8 END
FROM predictions p
JOIN wanted w ON w.variant = p.variant AND w.model_version = p.model_version
JOIN feedback f ON f.tenant_id = p.tenant_id AND f.request_id = p.request_id
CROSS JOIN LATERAL (
    SELECT max(key) AS positive, count(*) AS classes FROM jsonb_object_keys(p.probabilities) key
) k
WHERE p.model_name = {name} AND p.ts >= {start} AND p.ts < {end} AND {own}
"""


def _of_tenants(alias: str, tenants: Sequence[str] | None) -> sql.Composable:
    """The rows of `tenants` in the query itself too, so a role row-level security does not
    bind (a superuser DATABASE_URL) reads no other tenant's either."""
    if tenants is None:
        return sql.SQL("TRUE")
    return sql.SQL("{}.tenant_id = ANY({})").format(sql.Identifier(alias), list(tenants))


def live_numbers(
    database_url: str,
    model_name: str,
    versions: Mapping[str, str],
    *,
    start: datetime,
    step_start: datetime,
    end: datetime,
    tenants: Sequence[str] | None = None,
) -> dict[str, VariantNumbers]:
    """Each variant's numbers in [start, end) of `model_name`, its rows under its version
    only (`versions`: variant -> version, e.g. {"champion": "1", "challenger": "2"}).

    `step_start`: requests since then count as the current step's too. `tenants` limits
    the rows to their traffic (a tenant's own model); None reads every tenant's.
    """
    migrate(database_url)
    variants, wanted_versions = list(versions), [str(versions[v]) for v in versions]
    values = {
        "wanted": _WANTED.format(variants, wanted_versions),
        "name": sql.Literal(model_name),
        "start": sql.Literal(start),
        "end": sql.Literal(end),
    }
    counts = sql.SQL(_COUNTS).format(
        **values,
        step_start=sql.Literal(step_start),
        own=_of_tenants("p", tenants),
        own_errors=_of_tenants("e", tenants),
    )
    labelled = sql.SQL(_LABELLED).format(**values, own=_of_tenants("p", tenants))
    with connect(database_url, statement_timeout=None) as conn, conn.transaction():
        scope(conn, tenant_ids(conn) if tenants is None else tenants)
        count_rows = conn.execute(counts).fetchall()
        label_rows = conn.execute(labelled).fetchall()
    return {
        variant: _numbers(variant, versions[variant], row, label_rows)
        for variant, *row in count_rows
    }


def _numbers(
    variant: str, version: str, row: Sequence[Any], label_rows: Sequence[tuple[Any, ...]]
) -> VariantNumbers:
    requests, step_requests, errors, p50, p95 = row
    mine = [r for r in label_rows if r[0] == variant]
    binary = [(y, s) for _, _, y, s in mine if y is not None and s is not None]
    return VariantNumbers(
        variant=variant,
        version=str(version),
        requests=int(requests),
        step_requests=int(step_requests),
        errors=int(errors),
        latency_p50_ms=None if p50 is None else float(p50),
        latency_p95_ms=None if p95 is None else float(p95),
        labelled=len(mine),
        correct=sum(1 for r in mine if r[1]),
        labels=np.array([int(y) for y, _ in binary], dtype=np.int8),
        scores=np.array([float(s) for _, s in binary], dtype=float),
    )
