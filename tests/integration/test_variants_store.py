"""Per-variant live numbers from a real PostgreSQL prediction log, read as the flows role.

Known rows in, known numbers out: counts (in the window and since the step began), serving
errors, latency percentiles (PostgreSQL's percentile_cont, numpy's linear percentile),
labelled requests, accuracy and the ROC AUC's inputs; rows of other versions, variants,
models, tenants and times are left out.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg
import pytest

from common.localpg import LocalPostgres
from common.store import (
    Feedback,
    Prediction,
    connect,
    create_staging,
    migrate,
    roles,
    tenants,
    variants,
    write_items,
)

pytestmark = pytest.mark.integration

NAME = "churn-classifier"
T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
VERSIONS = {"champion": "1", "challenger": "2"}


def _prediction(  # noqa: PLR0917  (a row's columns, in the table's order)
    tenant: str,
    variant: str,
    version: str,
    at: datetime,
    latency: float,
    predicted: str,
    p1: float,
    *,
    model: str = NAME,
    classes: tuple[str, ...] = ("0", "1"),
) -> Prediction:
    probabilities = {c: (p1 if c == "1" else (1 - p1) / (len(classes) - 1)) for c in classes}
    return Prediction(
        str(uuid.uuid4()),
        at,
        model,
        version,
        {"x": 1.0},
        predicted,
        probabilities,
        latency,
        tenant,
        variant,
    )


@pytest.fixture
def admin_url(postgres: LocalPostgres) -> str:
    postgres.start()
    db = f"variants_{uuid.uuid4().hex[:12]}"
    postgres.create_database(db)
    url = postgres.url(db)
    migrate(url)
    roles.enable_login(url, roles.FLOWS)
    tenants.add_tenant(url, "globex")
    return url


def _write(url: str, items: list[Prediction | Feedback]) -> None:
    with connect(url) as conn:
        create_staging(conn)
        write_items(conn, items)


def _error(url: str, tenant: str, variant: str, version: str, at: datetime) -> None:
    with psycopg.connect(url, autocommit=True) as conn:  # as the owner, as the predictor would
        conn.execute(
            "INSERT INTO serving_errors VALUES (%s, %s, %s, %s, %s, %s, %s)",
            [uuid.uuid4(), tenant, at, NAME, version, variant, "ValueError: boom"],
        )


def test_each_variant_gets_its_own_numbers_and_nothing_else(admin_url: str) -> None:
    step = T0 + timedelta(minutes=10)
    champion_latency = [float(v) for v in range(1, 21)]  # 1..20 ms
    items: list[Prediction | Feedback] = []
    for i, latency in enumerate(champion_latency):
        at = T0 + timedelta(minutes=1 + i)  # 11 of them from the step on
        p = _prediction("default" if i % 2 else "globex", "champion", "1", at, latency, "1", 0.8)
        items.append(p)
        if i < 8:  # 8 labelled: 6 right (label 1), 2 wrong (label 0)
            items.append(Feedback(p.request_id, "1" if i < 6 else "0", at, p.tenant_id))
    challenger = [
        _prediction("globex", "challenger", "2", step + timedelta(seconds=i), 100.0, "0", p1)
        for i, p1 in enumerate((0.2, 0.6, 0.4))
    ]
    items += challenger
    items += [  # labels 0, 1, 0: predicted 0 every time, so 2 of 3 right
        Feedback(c.request_id, label, step, "globex")
        for c, label in zip(challenger, ("0", "1", "0"), strict=True)
    ]
    items += [  # none of these count
        _prediction("globex", "challenger", "3", step, 1.0, "1", 0.9),  # another version
        _prediction("globex", "shadow", "2", step, 1.0, "1", 0.9),  # a shadow
        _prediction("globex", "champion", "1", step, 1.0, "1", 0.9, model=f"{NAME}.acme"),
        _prediction("globex", "champion", "1", T0 - timedelta(hours=1), 1.0, "1", 0.9),
    ]
    _write(admin_url, items)
    _error(admin_url, "globex", "challenger", "2", step)
    _error(admin_url, "default", "challenger", "2", step)
    _error(admin_url, "default", "challenger", "3", step)  # another version's

    numbers = variants.live_numbers(
        roles.role_url(admin_url, roles.FLOWS),
        NAME,
        VERSIONS,
        start=T0,
        step_start=step,
        end=T0 + timedelta(hours=1),
    )

    champ, chall = numbers["champion"], numbers["challenger"]
    assert (champ.requests, champ.step_requests, champ.errors) == (20, 11, 0)
    assert champ.latency_p50_ms == pytest.approx(np.percentile(champion_latency, 50))
    assert champ.latency_p95_ms == pytest.approx(np.percentile(champion_latency, 95))
    assert (champ.labelled, champ.correct) == (8, 6)
    assert sorted(champ.labels.tolist()) == [0, 0, 1, 1, 1, 1, 1, 1]
    assert champ.scores.tolist() == pytest.approx([0.8] * 8)
    assert (chall.requests, chall.step_requests, chall.errors) == (3, 3, 2)
    assert chall.error_rate == pytest.approx(2 / 5)
    assert chall.latency_p95_ms == pytest.approx(100.0)
    assert (chall.labelled, chall.correct) == (3, 2)
    assert sorted(zip(chall.labels.tolist(), chall.scores.tolist(), strict=True)) == [
        (0, pytest.approx(0.2)),
        (0, pytest.approx(0.4)),
        (1, pytest.approx(0.6)),
    ]
    assert chall.summary()["accuracy"] == pytest.approx(2 / 3)


def test_a_tenants_numbers_are_its_own_rows_only(admin_url: str) -> None:
    _write(
        admin_url,
        [
            _prediction("globex", "champion", "1", T0, 1.0, "1", 0.9),
            _prediction("default", "champion", "1", T0, 1.0, "1", 0.9),
        ],
    )
    _error(admin_url, "default", "challenger", "2", T0)
    numbers = variants.live_numbers(
        roles.role_url(admin_url, roles.FLOWS),
        NAME,
        VERSIONS,
        start=T0,
        step_start=T0,
        end=T0 + timedelta(hours=1),
        tenants=["globex"],
    )
    assert numbers["champion"].requests == 1
    assert (numbers["challenger"].requests, numbers["challenger"].errors) == (0, 0)
    assert numbers["challenger"].latency_p95_ms is None


def test_a_multiclass_model_gives_accuracy_but_no_auc_inputs(admin_url: str) -> None:
    p = _prediction("default", "champion", "1", T0, 1.0, "b", 0.5, classes=("a", "b", "c"))
    _write(admin_url, [p, Feedback(p.request_id, "b", T0, "default")])
    numbers = variants.live_numbers(
        roles.role_url(admin_url, roles.FLOWS),
        NAME,
        VERSIONS,
        start=T0,
        step_start=T0,
        end=T0 + timedelta(hours=1),
    )
    assert (numbers["champion"].labelled, numbers["champion"].correct) == (1, 1)
    assert numbers["champion"].labels.size == 0
