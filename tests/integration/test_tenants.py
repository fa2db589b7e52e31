"""Tenants, keys and row-level security against a real PostgreSQL, role by role.

Three tenants each log predictions, labels and monitoring rows. Then every role a service
logs in as (predictor, flows, Grafana, the operator, a tenant's SQL reader) tries to read
the others' rows: with a forgotten WHERE, with a forgotten scope, with another tenant's id
in the WHERE, with the setting forged. Each gets 0 rows or "permission denied".
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from common.errors import UserError
from common.localpg import LocalPostgres
from common.store import (
    VARIANTS,
    Feedback,
    Prediction,
    create_staging,
    migrate,
    monitoring,
    pool,
    prediction_exists,
    readback,
    roles,
    tenants,
    write_items,
)
from common.store.connection import connect
from common.store.migrations import MIGRATIONS_DIR

pytestmark = pytest.mark.integration

TENANTS = ("acme", "globex", "initech")
T0 = datetime(2026, 11, 1, tzinfo=UTC)
ROWS_EACH = 7


def prediction(tenant: str, i: int) -> Prediction:
    return Prediction(
        request_id=str(uuid.uuid4()),
        ts=T0 + timedelta(minutes=i),
        model_name="churn-classifier",
        model_version="1",
        inputs={"tenure_months": i, "plan": tenant},
        predicted="yes",
        probabilities={"no": 0.4, "yes": 0.6},
        latency_ms=1.0,
        tenant_id=tenant,
        variant=VARIANTS[i % len(VARIANTS)],
    )


@pytest.fixture
def db(postgres: LocalPostgres) -> Iterator[dict[str, Any]]:
    """A migrated database holding three tenants' rows; URLs per role, ids per tenant."""
    postgres.start()
    name = f"tenants_{uuid.uuid4().hex[:12]}"
    postgres.create_database(name)
    admin = postgres.url(name)
    migrate(admin)
    for role in roles.SERVICE_ROLES:
        roles.enable_login(admin, role)
    operator = f"operator_{uuid.uuid4().hex[:8]}"  # a non-superuser operator, like compose's
    with connect(admin) as conn:
        conn.execute(f'CREATE ROLE "{operator}" LOGIN IN ROLE mlops_admin')
    ids: dict[str, list[str]] = {}
    items: list[Prediction | Feedback] = []
    for tenant in TENANTS:
        tenants.add_tenant(admin, tenant, tenant.title())
        rows = [prediction(tenant, i) for i in range(ROWS_EACH)]
        ids[tenant] = [p.request_id for p in rows]
        items += rows
        items.append(Feedback(rows[0].request_id, "yes", T0 + timedelta(hours=1), tenant, "test"))
    predictor = roles.role_url(admin, roles.PREDICTOR)
    with connect(predictor) as conn:  # the predictor's writer, all tenants in one batch
        create_staging(conn)
        write_items(conn, items)
    flows = roles.role_url(admin, roles.FLOWS)
    for owner in (*TENANTS, None):
        monitoring.write_results(flows, run_record(owner), [("share_drifted", None, 0.5)])
    yield {
        "admin": admin,
        "predictor": predictor,
        "flows": flows,
        "grafana": roles.role_url(admin, roles.GRAFANA),
        "operator": roles.role_url(admin, operator),
        "ids": ids,
    }
    with connect(admin) as conn:
        conn.execute(f'DROP OWNED BY "{operator}"')
        conn.execute(f'DROP ROLE "{operator}"')


def run_record(tenant: str | None) -> monitoring.RunRecord:
    return monitoring.RunRecord(
        run_id=str(uuid.uuid4()),
        model_name="churn-classifier",
        model_version="1",
        window_start=T0,
        window_end=T0 + timedelta(hours=1),
        current_rows=ROWS_EACH,
        labelled_rows=1,
        enough_rows=False,
        drift_detected=False,
        summary="test",
        tenant_id=tenant,
    )


def select(url: str, query: str, tenant: str | list[str] | None = None) -> list[tuple[Any, ...]]:
    """Run `query` as the URL's role, in a transaction scoped to `tenant` (or none)."""
    with connect(url) as conn, conn.transaction():
        if tenant is not None:
            tenants.scope(conn, tenant)
        return conn.execute(query).fetchall()


@pytest.mark.parametrize("role", ["predictor", "flows", "operator"])
def test_a_service_role_sees_only_the_tenant_its_transaction_names(
    db: dict[str, Any], role: str
) -> None:
    url = db[role]
    for tenant in TENANTS:
        others = [t for t in TENANTS if t != tenant]
        # a forgotten WHERE: only the scoped tenant's rows come back
        rows = select(url, "SELECT DISTINCT tenant_id FROM predictions", tenant)
        assert rows == [(tenant,)]
        assert select(url, "SELECT count(*) FROM feedback", tenant) == [(1,)]
        # another tenant's id in the WHERE: nothing
        for other in others:
            query = f"SELECT count(*) FROM predictions WHERE tenant_id = '{other}'"
            assert select(url, query, tenant) == [(0,)]
            ids = "', '".join(db["ids"][other])
            query = f"SELECT count(*) FROM feedback WHERE request_id IN ('{ids}')"
            assert select(url, query, tenant) == [(0,)]
    # a forgotten scope: nothing at all
    assert select(url, "SELECT count(*) FROM predictions") == [(0,)]
    assert select(url, "SELECT count(*) FROM feedback") == [(0,)]


def test_the_predictor_cannot_widen_its_scope_to_several_tenants(db: dict[str, Any]) -> None:
    assert select(db["predictor"], "SELECT count(*) FROM predictions", ["acme", "globex"]) == [(0,)]
    assert select(db["flows"], "SELECT count(*) FROM predictions", ["acme", "globex"]) == [
        (2 * ROWS_EACH,)
    ]


def test_the_setting_ends_with_the_transaction(db: dict[str, Any]) -> None:
    with connect(db["predictor"]) as conn:
        with conn.transaction():
            tenants.scope(conn, "acme")
            assert conn.execute("SELECT count(*) FROM predictions").fetchone() == (ROWS_EACH,)
        assert conn.execute("SELECT count(*) FROM predictions").fetchone() == (0,)


def test_a_row_of_another_tenant_cannot_be_written_under_this_tenants_scope(
    db: dict[str, Any],
) -> None:
    insert = (
        "INSERT INTO predictions (tenant_id, request_id, ts, model_name, model_version,"
        " inputs, predicted, probabilities, latency_ms)"
        " VALUES ('globex', gen_random_uuid(), now(), 'm', '1', '{}', 'yes', '{}', 1)"
    )
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        select(db["predictor"], insert + " RETURNING 1", "acme")
    # a label of this tenant cannot be handed to another
    moved = "UPDATE feedback SET tenant_id = 'globex' RETURNING 1"
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        select(db["predictor"], moved, "acme")


@pytest.mark.parametrize(
    ("role", "table"),
    [
        ("predictor", "api_keys"),
        ("predictor", "tenants"),
        ("predictor", "monitoring_runs"),
        ("flows", "api_keys"),
        ("grafana", "predictions"),
        ("grafana", "feedback"),
        ("grafana", "api_keys"),
        ("grafana", "tenants"),
    ],
)
def test_a_role_cannot_read_tables_it_has_no_business_with(
    db: dict[str, Any], role: str, table: str
) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
        select(db[role], f"SELECT * FROM {table}", "acme")


def test_grafana_charts_every_models_monitoring_whatever_tenant_is_set(
    db: dict[str, Any],
) -> None:
    """The operator's dashboard: each model's numbers (the tenant variable picks); never a
    prediction or a label (test_a_role_cannot_read_tables_it_has_no_business_with)."""
    every = select(db["admin"], "SELECT tenant_id FROM monitoring_runs ORDER BY 1")
    assert select(db["grafana"], "SELECT tenant_id FROM monitoring_runs ORDER BY 1") == every
    assert select(db["grafana"], "SELECT tenant_id FROM monitoring_runs ORDER BY 1", "acme") == (
        every
    )
    assert {r[0] for r in every} > {None}  # a tenant's own rows are among them
    metrics = select(db["grafana"], "SELECT DISTINCT tenant_id FROM monitoring_metrics")
    assert {r[0] for r in metrics} == {r[0] for r in every}


def test_flows_see_shared_monitoring_and_only_the_listed_tenants_own(db: dict[str, Any]) -> None:
    rows = select(db["flows"], "SELECT tenant_id FROM monitoring_runs ORDER BY 1", "globex")
    assert rows == [("globex",), (None,)]
    history = monitoring.history(db["flows"], "churn-classifier", "share_drifted", "acme")
    assert [h["value"] for h in history] == [0.5]


def test_a_tenants_sql_role_reads_only_its_own_rows_whatever_it_sets(
    db: dict[str, Any],
) -> None:
    role, password = tenants.create_reader_role(db["admin"], "acme")
    url = roles.role_url(db["admin"], role, password)
    assert select(url, "SELECT DISTINCT tenant_id FROM predictions") == [("acme",)]
    assert select(url, "SELECT count(*) FROM predictions", "globex") == [(ROWS_EACH,)]
    forged = "SELECT count(*) FROM predictions WHERE tenant_id = 'globex'"
    assert select(url, forged, "globex") == [(0,)]
    assert select(url, "SELECT count(*) FROM feedback") == [(1,)]
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        select(
            url,
            "INSERT INTO feedback (tenant_id, request_id, label, ts) VALUES"
            " ('acme', gen_random_uuid(), 'x', now())",
        )
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        select(url, "SELECT * FROM monitoring_runs")
    tenants.remove_tenant(db["admin"], "acme")
    with pytest.raises(psycopg.OperationalError):
        select(url, "SELECT 1")  # the role went with the tenant


def test_a_feedback_lookup_does_not_find_another_tenants_prediction(db: dict[str, Any]) -> None:
    lookups = pool(db["predictor"])
    lookups.open(wait=True)
    try:
        acme_id = db["ids"]["acme"][0]
        assert prediction_exists(lookups, acme_id, "acme") is True
        assert prediction_exists(lookups, acme_id, "globex") is False
        assert prediction_exists(lookups, str(uuid.uuid4()), "globex") is False
    finally:
        lookups.close()


def test_keys_authenticate_rotate_and_revoke(db: dict[str, Any]) -> None:
    admin = db["admin"]
    first = tenants.create_key(admin, "acme")
    assert first.secret.startswith(f"mlops_{first.key_id}_")
    who = tenants.authenticate(db["predictor"], first.secret)
    assert who == tenants.Identity("acme", first.key_id, frozenset({"predict", "feedback"}))
    # malformed, unknown, a right id with a wrong secret
    assert tenants.authenticate(db["predictor"], "nonsense") is None
    wrong = first.secret[:-4] + ("AAAA" if not first.secret.endswith("AAAA") else "BBBB")
    assert tenants.authenticate(db["predictor"], wrong) is None
    assert tenants.authenticate(db["predictor"], "mlops_" + "0" * 16 + "_" + "a" * 43) is None
    # rotation: both live during the overlap
    second, old = tenants.rotate_key(admin, "acme", grace=timedelta(hours=1))
    assert old == [first.key_id]
    assert tenants.authenticate(db["predictor"], first.secret) is not None
    assert tenants.authenticate(db["predictor"], second.secret) is not None
    # revocation ends the old key at once, and only it
    assert tenants.revoke_key(admin, "acme", first.key_id) == [first.key_id]
    assert tenants.authenticate(db["predictor"], first.secret) is None
    assert tenants.authenticate(db["predictor"], second.secret) is not None
    # a rotation with no grace ends the old key at once too
    third, _ = tenants.rotate_key(admin, "acme", grace=timedelta(0))
    assert tenants.authenticate(db["predictor"], second.secret) is None
    assert tenants.authenticate(db["predictor"], third.secret) is not None
    # another tenant's key id cannot be revoked through this tenant
    other = tenants.create_key(admin, "globex", ["predict"])
    with pytest.raises(UserError, match="no live key"):
        tenants.revoke_key(admin, "acme", other.key_id)
    assert tenants.authenticate(db["predictor"], other.secret) is not None
    # removing the tenant ends its keys
    tenants.remove_tenant(admin, "acme", purge=True)
    assert tenants.authenticate(db["predictor"], third.secret) is None
    assert select(db["operator"], "SELECT count(*) FROM predictions", "acme") == [(0,)]
    assert select(db["operator"], "SELECT count(*) FROM predictions", "globex") == [(ROWS_EACH,)]


def test_a_revocation_is_announced_to_key_caches(db: dict[str, Any]) -> None:
    key = tenants.create_key(db["admin"], "acme")
    with psycopg.connect(db["predictor"], autocommit=True) as listener:
        listener.execute(f"LISTEN {tenants.KEYS_CHANNEL}")
        tenants.revoke_key(db["admin"], "acme", key.key_id)
        notes = list(listener.notifies(timeout=5, stop_after=1))
    assert [n.payload for n in notes] == [key.key_id]


def test_bad_tenant_ids_and_scopes_are_refused_with_a_clear_error(db: dict[str, Any]) -> None:
    with pytest.raises(UserError, match="not valid"):
        tenants.add_tenant(db["admin"], "Acme Corp")
    with pytest.raises(UserError, match="exists already"):
        tenants.add_tenant(db["admin"], "acme")
    with pytest.raises(UserError, match="no tenant 'nobody'"):
        tenants.create_key(db["admin"], "nobody")
    with pytest.raises(UserError, match="scopes"):
        tenants.create_key(db["admin"], "acme", ["root"])


def test_a_tenant_reads_its_predictions_back_page_by_page(db: dict[str, Any]) -> None:
    lookups = pool(db["predictor"])
    lookups.open(wait=True)
    try:
        seen: list[str] = []
        variants: list[str] = []
        cursor = None
        while True:
            page = readback.read_page(lookups, "globex", cursor=cursor, limit=3)
            seen += [r["request_id"] for r in page.rows]
            variants += [r["variant"] for r in page.rows]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert seen == db["ids"]["globex"]
        assert variants == [VARIANTS[i % len(VARIANTS)] for i in range(ROWS_EACH)]
        first = readback.read_page(lookups, "globex", limit=1).rows[0]
        assert (first["label"], first["label_source"]) == ("yes", "test")
        later = readback.read_page(lookups, "globex", start=T0 + timedelta(minutes=5))
        assert len(later.rows) == ROWS_EACH - 5
        assert readback.read_page(lookups, "globex", model_version="2").rows == []
        with pytest.raises(ValueError, match="cursor"):
            readback.read_page(lookups, "globex", cursor="not-a-cursor")
    finally:
        lookups.close()


def test_an_older_database_gives_its_rows_to_the_default_tenant(postgres: LocalPostgres) -> None:
    postgres.start()
    name = f"tenants_old_{uuid.uuid4().hex[:8]}"
    postgres.create_database(name)
    url = postgres.url(name)
    with connect(url) as conn:  # the schema as it was before tenants, with a row in it
        conn.execute(
            "CREATE TABLE schema_migrations (name text PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for path in sorted(MIGRATIONS_DIR.glob("000[123]_*.sql")):
            conn.execute(path.read_bytes())
            conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", [path.stem])
        conn.execute(
            "INSERT INTO predictions (request_id, ts, model_name, model_version, inputs,"
            " predicted, probabilities, latency_ms)"
            " VALUES (gen_random_uuid(), now(), 'm', '1', '{}', 'yes', '{}', 1)"
        )
    # a service role may not bring the schema up to date
    roles.enable_login(url, roles.PREDICTOR)
    with pytest.raises(UserError, match=r"python -m common\.store upgrade"):
        migrate(roles.role_url(url, roles.PREDICTOR))
    assert "0004_tenants" in migrate(url)
    assert select(
        roles.role_url(url, roles.PREDICTOR),
        "SELECT count(*) FROM predictions",
        tenants.DEFAULT_TENANT,
    ) == [(1,)]
    assert migrate(roles.role_url(url, roles.PREDICTOR)) == []
