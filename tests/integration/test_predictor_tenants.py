"""Three tenants on one predictor, over HTTP: each key sees and labels only its own tenant's rows.

A real `bentoml serve` (2 workers) logging in as `mlops_predictor`, so row-level security
is what stands between tenants; a real PostgreSQL with three tenants, each with a key per
scope. Every cross-tenant attempt is refused: another tenant's request id on /feedback is
a 404 exactly as an unknown one, and GET /predictions returns the caller's rows and only
those under every filter, page size and cursor. Missing, malformed, unknown and revoked
keys are 401 on every protected route, a missing scope 403; a revoked key is refused
within a second by both workers; a rotated key works beside the new one until revoked.
"""

from __future__ import annotations

import base64
import concurrent.futures
import itertools
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from common.localpg import LocalPostgres
from common.store import Feedback, Prediction, create_staging, tenants, write_items
from common.store.connection import connect
from common.store.readback import encode_cursor
from tests.integration.serving import (
    api_key,
    auth,
    predictor_database,
    register_copies,
    serve_predictor,
)
from tests.integration.test_predictor import RECORD
from tests.servers import HttpServer, throwaway_cluster
from tests.workspace import Workspace

SERVED = "churn-tenants"
TENANTS = ("acme", "globex", "initech")
OLD_VERSION = {"acme": "7", "globex": "8", "initech": "9"}
"""Each tenant's rows of an older model version: another tenant's version finds nothing."""
T0 = datetime(2026, 11, 1, tzinfo=UTC)
OLD_ROWS = 8


@dataclass(frozen=True)
class Tenant:
    """A tenant's keys, one per set of scopes."""

    id: str
    full: str  # predict + feedback
    predict: str
    feedback: str
    admin: str


@pytest.fixture(scope="module")
def logdb() -> Iterator[LocalPostgres]:
    with throwaway_cluster("tenants", "predictions") as pg:
        yield pg


@pytest.fixture(scope="module")
def urls(logdb: LocalPostgres) -> tuple[str, str]:
    """(the owner's URL, the predictor role's URL)."""
    return predictor_database(logdb)


@pytest.fixture(scope="module")
def predictor(
    mlflow_server: HttpServer,
    pipeline: Workspace,
    urls: tuple[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    register_copies(mlflow_server.url, SERVED, versions=1)
    env = {
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "MODEL_NAME": SERVED,
        "MODEL_POLL_SECONDS": "600",
        "DATABASE_URL": urls[1],
    }
    with serve_predictor(tmp_path_factory.mktemp("tenants"), env) as url:
        yield url


@pytest.fixture(scope="module")
def tenant_keys(urls: tuple[str, str]) -> dict[str, Tenant]:
    admin = urls[0]
    return {
        t: Tenant(
            t,
            full=api_key(admin, t, ("predict", "feedback")),
            predict=api_key(admin, t, ("predict",)),
            feedback=api_key(admin, t, ("feedback",)),
            admin=api_key(admin, t, ("admin",)),
        )
        for t in TENANTS
    }


def old_rows(tenant: str) -> list[Prediction | Feedback]:
    """A tenant's rows from a month ago, of its own older version, every other one labelled."""
    items: list[Prediction | Feedback] = []
    for i in range(OLD_ROWS):
        p = Prediction(
            str(uuid.uuid4()),
            T0 + timedelta(hours=i),
            SERVED,
            OLD_VERSION[tenant],
            {"tenure_months": i},
            "1",
            {"0": 0.3, "1": 0.7},
            1.0,
            tenant,
        )
        items.append(p)
        if i % 2 == 0:
            items.append(Feedback(p.request_id, "1", p.ts + timedelta(days=1), tenant, "batch"))
    return items


@pytest.fixture(scope="module")
def logged(
    predictor: str, tenant_keys: dict[str, Tenant], urls: tuple[str, str]
) -> dict[str, list[str]]:
    """Each tenant's request ids: a month-old batch written as the predictor, and today's
    predictions over HTTP with its own key (one labelled through /feedback)."""
    admin, as_predictor = urls
    with connect(as_predictor) as conn:
        create_staging(conn)
        write_items(conn, [item for t in TENANTS for item in old_rows(t)])
    ids: dict[str, list[str]] = {}
    for t, keys in tenant_keys.items():
        for _ in range(3):
            resp = predict(predictor, keys.full, [RECORD, RECORD])
            assert resp.status_code == 200, resp.text
            assert resp.json()["tenant_id"] == t
        answered = [a["request_id"] for a in resp.json()["predictions"]]
        label = {"request_id": answered[0], "label": "0"}
        resp = httpx.post(f"{predictor}/feedback", json=label, headers=auth(keys.full), timeout=30)
        assert resp.status_code == 200, resp.text
        assert resp.json()["tenant_id"] == t
    deadline = time.monotonic() + 30
    while True:  # predictions and labels are logged off the request path
        with connect(admin) as conn:
            rows = conn.execute(
                "SELECT tenant_id, request_id::text FROM predictions ORDER BY ts, request_id"
            ).fetchall()
            labels = conn.execute("SELECT count(*) FROM feedback").fetchone()
        if len(rows) == len(TENANTS) * (OLD_ROWS + 6) and labels == (len(TENANTS) * 5,):
            break
        assert time.monotonic() < deadline, (len(rows), labels)
        time.sleep(0.3)
    for tenant, request_id in rows:
        ids.setdefault(tenant, []).append(request_id)
    return ids


def predict(url: str, key: str, records: Any) -> httpx.Response:
    return httpx.post(f"{url}/predict", json={"records": records}, headers=auth(key), timeout=30)


def read_all(url: str, key: str, **params: Any) -> list[dict[str, Any]]:
    """Every page of GET /predictions for these filters, following `next_cursor`."""
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(100):
        query = {k: v for k, v in {**params, "cursor": cursor}.items() if v is not None}
        resp = httpx.get(f"{url}/predictions", params=query, headers=auth(key), timeout=30)
        assert resp.status_code == 200, (query, resp.text)
        page = resp.json()
        rows += page["rows"]
        cursor = page["next_cursor"]
        if cursor is None:
            return rows
    raise AssertionError("more than 100 pages")


def truth(admin: str, tenant: str) -> list[dict[str, Any]]:
    """What the tenant owns, read as the database owner (row-level security does not apply)."""
    with connect(admin) as conn:
        rows = conn.execute(
            "SELECT p.request_id::text, p.ts, p.model_version, f.label FROM predictions p"
            " LEFT JOIN feedback f USING (tenant_id, request_id) WHERE p.tenant_id = %s"
            " ORDER BY p.ts, p.request_id",
            [tenant],
        ).fetchall()
    return [{"request_id": r[0], "ts": r[1], "model_version": r[2], "label": r[3]} for r in rows]


# -- the key decides the tenant ------------------------------------------------------------


def test_every_row_and_answer_carries_the_tenant_of_the_key(
    logged: dict[str, list[str]], urls: tuple[str, str]
) -> None:
    assert sorted(logged) == sorted(TENANTS)
    with connect(urls[0]) as conn:
        sources = conn.execute(
            "SELECT tenant_id, source FROM feedback WHERE source LIKE 'key:%'"
        ).fetchall()
    assert sorted(t for t, _ in sources) == sorted(TENANTS)  # one label each, from its key


def test_no_body_can_choose_the_tenant(predictor: str, tenant_keys: dict[str, Tenant]) -> None:
    key = tenant_keys["acme"].full
    for path, body in (
        ("/predict", {"records": RECORD, "tenant_id": "globex"}),
        ("/feedback", {"request_id": str(uuid.uuid4()), "label": "1", "tenant_id": "globex"}),
    ):
        resp = httpx.post(f"{predictor}{path}", json=body, headers=auth(key), timeout=30)
        assert resp.status_code == 400, resp.text
        assert "tenant_id" in resp.text


# -- cross-tenant attempts -------------------------------------------------------------------


def test_another_tenants_request_id_is_404_exactly_as_an_unknown_one(
    predictor: str,
    tenant_keys: dict[str, Tenant],
    logged: dict[str, list[str]],
    urls: tuple[str, str],
) -> None:
    attempts = [
        (caller, rid)
        for caller, owner in itertools.permutations(TENANTS, 2)
        for rid in (logged[owner][0], logged[owner][-1])  # a month-old one and today's
    ]
    unknown = str(uuid.uuid4())

    def send(caller: str, request_id: str) -> httpx.Response:
        body = {"request_id": request_id, "label": "1"}
        key = tenant_keys[caller].full
        return httpx.post(f"{predictor}/feedback", json=body, headers=auth(key), timeout=30)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda a: send(*a), [*attempts, ("acme", unknown)]))
    *cross, alone = answers
    assert alone.status_code == 404
    assert alone.json() == {"error": f"no prediction with request_id {unknown}"}
    for (_, rid), resp in zip(attempts, cross, strict=True):
        assert resp.status_code == 404, resp.text
        assert resp.json() == {"error": f"no prediction with request_id {rid}"}
        assert dict(resp.headers).keys() == dict(alone.headers).keys()
    time.sleep(1)  # a wrongly accepted label would be logged by now
    with connect(urls[0]) as conn:
        foreign = conn.execute(
            "SELECT count(*) FROM feedback f WHERE NOT EXISTS (SELECT 1 FROM predictions p"
            " WHERE p.tenant_id = f.tenant_id AND p.request_id = f.request_id)"
        ).fetchone()
    assert foreign == (0,)


FILTERS: dict[str, list[Any]] = {
    "start": [None, T0 + timedelta(hours=3), "2026-11-01T05:30:00+05:30", "1990-01-01T00:00:00Z"],
    "end": [None, T0 + timedelta(hours=5), "2100-01-01T00:00:00-08:00"],
    "model_version": [None, "1", *OLD_VERSION.values(), "no-such-version"],
}


def _expected(rows: list[dict[str, Any]], start: Any, end: Any, version: str | None) -> list[str]:
    def instant(value: Any) -> datetime | None:
        return datetime.fromisoformat(value) if isinstance(value, str) else value

    lo, hi = instant(start), instant(end)
    return [
        r["request_id"]
        for r in rows
        if (lo is None or r["ts"] >= lo)
        and (hi is None or r["ts"] < hi)
        and (version is None or r["model_version"] == version)
    ]


@pytest.mark.parametrize("tenant", TENANTS)
def test_reading_back_returns_the_callers_rows_and_only_those_under_every_filter(
    predictor: str,
    tenant_keys: dict[str, Tenant],
    logged: dict[str, list[str]],
    urls: tuple[str, str],
    tenant: str,
) -> None:
    own = truth(urls[0], tenant)
    assert [r["request_id"] for r in own] == logged[tenant]
    everyone_else = {rid for t, ids in logged.items() if t != tenant for rid in ids}
    key = tenant_keys[tenant].predict
    for start, end, version in itertools.product(*FILTERS.values()):
        params = {
            "start": start.isoformat() if isinstance(start, datetime) else start,
            "end": end.isoformat() if isinstance(end, datetime) else end,
            "model_version": version,
            "limit": 1000,
        }
        got = read_all(predictor, key, **params)
        ids = [r["request_id"] for r in got]
        assert not everyone_else & set(ids), params
        assert ids == _expected(own, start, end, version), params
    for limit in (1, 3):  # paging: every own row once, in time order, nobody else's
        for version in (None, OLD_VERSION[tenant]):
            got = read_all(predictor, key, limit=limit, model_version=version)
            assert [r["request_id"] for r in got] == _expected(own, None, None, version)
    labelled = {r["request_id"]: r["label"] for r in own}
    for row in read_all(predictor, tenant_keys[tenant].feedback):  # a labeller reads too
        assert row["label"] == labelled[row["request_id"]]


def test_a_cursor_pointing_into_another_tenants_rows_still_reads_only_the_callers(
    predictor: str, tenant_keys: dict[str, Tenant], urls: tuple[str, str]
) -> None:
    for caller, owner in itertools.permutations(TENANTS, 2):
        theirs = truth(urls[0], owner)
        own = truth(urls[0], caller)
        for row in (theirs[0], theirs[len(theirs) // 2], theirs[-1]):
            cursor = encode_cursor(row["ts"], row["request_id"])
            resp = httpx.get(
                f"{predictor}/predictions",
                params={"cursor": cursor, "limit": 1000},
                headers=auth(tenant_keys[caller].full),
                timeout=30,
            )
            assert resp.status_code == 200, resp.text
            ids = [r["request_id"] for r in resp.json()["rows"]]
            after = (row["ts"], row["request_id"])
            assert ids == [r["request_id"] for r in own if (r["ts"], r["request_id"]) > after]


def test_bad_read_back_parameters_are_400_naming_the_parameter(
    predictor: str, tenant_keys: dict[str, Tenant]
) -> None:
    junk = base64.urlsafe_b64encode(b"2026-11-01T00:00:00|not-a-uuid").decode()
    for params, named in (
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"start": "yesterday"}, "start"),
        ({"end": "2026-11-01T00:00:00"}, "end"),  # no UTC offset: which day would it be?
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": junk}, "cursor"),
        ({"model_verison": "1"}, "model_verison"),  # a misspelt filter does not read it all
    ):
        resp = httpx.get(
            f"{predictor}/predictions",
            params=params,
            headers=auth(tenant_keys["acme"].full),
            timeout=30,
        )
        assert resp.status_code == 400, (params, resp.text)
        assert resp.json()["error"].startswith(named), resp.text


# -- keys: missing, bad, revoked, rotated; scopes ----------------------------------------------


def protected(url: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, URL, request arguments) for every route that needs a key."""
    return [
        ("POST", f"{url}/predict", {"json": {"records": RECORD}}),
        ("POST", f"{url}/feedback", {"json": {"request_id": str(uuid.uuid4()), "label": "1"}}),
        ("GET", f"{url}/predictions", {}),
        ("GET", f"{url}/model/", {}),
        ("POST", f"{url}/webhooks/mlflow", {"json": {}}),
    ]


def test_missing_malformed_unknown_and_revoked_keys_are_401_everywhere(
    predictor: str, tenant_keys: dict[str, Tenant], urls: tuple[str, str]
) -> None:
    admin = urls[0]
    revoked = tenants.create_key(admin, "globex", tenants.SCOPES)
    tenants.revoke_key(admin, "globex", revoked.key_id)
    real = tenant_keys["acme"].full
    forged = real[:-1] + ("B" if real[-1] != "B" else "C")  # a real key id, another secret
    bad: dict[str, tuple[dict[str, str], str | None]] = {
        "none": ({}, None),
        "bearer without a key": ({"authorization": "Bearer"}, "invalid_request"),
        "basic auth": ({"authorization": "Basic YWNtZTpwdw=="}, "invalid_request"),
        "malformed": ({"authorization": "Bearer acme-key"}, "invalid_token"),
        "malformed x-api-key": ({"x-api-key": "mlops_123_abc"}, "invalid_token"),
        "unknown": (auth(f"mlops_{'0' * 16}_{'A' * 43}"), "invalid_token"),
        "wrong secret": (auth(forged), "invalid_token"),
        "revoked": (auth(revoked.secret), "invalid_token"),
        "revoked as x-api-key": ({"x-api-key": revoked.secret}, "invalid_token"),
    }
    for name, (headers, error) in bad.items():
        for method, url, kwargs in protected(predictor):
            resp = httpx.request(method, url, headers=headers, timeout=30, **kwargs)
            assert resp.status_code == 401, (name, method, url, resp.text)
            challenge = resp.headers["www-authenticate"]
            assert challenge.startswith('Bearer realm="predictor"'), (name, challenge)
            assert (f'error="{error}"' in challenge) if error else ("error=" not in challenge)
            assert resp.json()["error"], name


SCOPED = {
    # key kind -> the protected routes (by index in `protected`) it may use
    "full": {0, 1, 2},
    "predict": {0, 2},
    "feedback": {1, 2},
    "admin": {3, 4},
}


@pytest.mark.parametrize("kind", sorted(SCOPED))
def test_a_key_without_the_routes_scope_is_403(
    predictor: str, tenant_keys: dict[str, Tenant], kind: str
) -> None:
    key = getattr(tenant_keys["initech"], kind)
    for i, (method, url, kwargs) in enumerate(protected(predictor)):
        resp = httpx.request(method, url, headers=auth(key), timeout=30, **kwargs)
        if i in SCOPED[kind]:
            assert resp.status_code in (200, 404), (kind, method, url, resp.text)  # 404: feedback
        else:
            assert resp.status_code == 403, (kind, method, url, resp.text)
            assert 'error="insufficient_scope"' in resp.headers["www-authenticate"]


def fresh_requests(url: str, key: str, n: int) -> list[int]:
    """Statuses of `n` GET /predictions on new connections, so both workers answer some."""
    return [
        httpx.get(
            f"{url}/predictions", params={"limit": 1}, headers=auth(key), timeout=30
        ).status_code
        for _ in range(n)
    ]


def test_a_revoked_key_is_refused_within_a_second_by_every_worker(
    predictor: str, tenant_keys: dict[str, Tenant], urls: tuple[str, str]
) -> None:
    admin = urls[0]
    key = tenants.create_key(admin, "acme", ("predict", "admin"))
    assert set(fresh_requests(predictor, key.secret, 20)) == {200}  # cached in both workers
    for _ in range(8):  # every worker hears revocations (else it would not cache)
        info = httpx.get(
            f"{predictor}/model/", headers=auth(key.secret), follow_redirects=True, timeout=30
        ).json()
        assert info["api_key_listener_up"] is True
    tenants.revoke_key(admin, "acme", key.key_id)
    revoked_at = time.monotonic()
    time.sleep(max(0.0, revoked_at + 1.0 - time.monotonic()))
    assert set(fresh_requests(predictor, key.secret, 30)) == {401}
    assert set(fresh_requests(predictor, tenant_keys["acme"].predict, 4)) == {200}


def test_a_rotated_key_works_beside_the_new_one_until_revoked(
    predictor: str, urls: tuple[str, str]
) -> None:
    admin = urls[0]
    tenants.add_tenant(admin, "rotates")
    old = tenants.create_key(admin, "rotates", ("predict",))
    assert set(fresh_requests(predictor, old.secret, 6)) == {200}
    new, expiring = tenants.rotate_key(admin, "rotates")
    assert expiring == [old.key_id]
    assert new.scopes == ("predict",)
    assert set(fresh_requests(predictor, old.secret, 6)) == {200}  # the overlap
    assert set(fresh_requests(predictor, new.secret, 6)) == {200}
    tenants.revoke_key(admin, "rotates", old.key_id)
    time.sleep(1)
    assert set(fresh_requests(predictor, old.secret, 10)) == {401}
    assert set(fresh_requests(predictor, new.secret, 6)) == {200}
