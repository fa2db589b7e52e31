"""Who is calling: the key a request carries, the scopes a path needs, the key cache, and
MLflow's webhook signature (checked against MLflow's own signing code)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any, cast

import psycopg
import pytest
from mlflow.webhooks.delivery import _generate_hmac_signature
from psycopg_pool import ConnectionPool

from common.store.tenants import Identity
from services.predictor import identity
from services.predictor.identity import AccessError, Keys, KeysUnavailableError

KEY = "mlops_0123456789abcdef_" + "A" * 43
OTHER = "mlops_fedcba9876543210_" + "B" * 43
ACME = Identity("acme", "0123456789abcdef", frozenset({"predict"}))


@pytest.mark.parametrize(
    ("path", "needed"),
    [
        ("/livez", None),
        ("/readyz", None),
        ("/metrics", None),
        ("/docs.json", None),
        ("/", None),
        ("/static_content/swagger-ui.css", None),
        ("/predict", {"predict"}),
        ("/feedback", {"feedback"}),
        ("/predictions", {"predict", "feedback"}),
        ("/model", {"admin"}),
        ("/model/", {"admin"}),
        ("/model/docs", {"admin"}),
        ("/webhooks/mlflow", {"admin"}),
        ("/jobs", {"predict"}),
        ("/jobs/0b7c1e52-6a11-4c43-9d55-3f1f2a0a8a51", {"predict"}),
        ("/jobs/not-an-id", {"predict"}),
        ("/predict/", set()),  # any valid key; the route then redirects or 404s
        ("/nowhere", set()),
    ],
)
def test_every_path_but_health_metrics_and_docs_needs_a_key(
    path: str, needed: set[str] | None
) -> None:
    found = identity.required_scopes(path)
    assert (None if found is None else set(found)) == needed


@pytest.mark.parametrize(
    "headers",
    [
        {"authorization": f"Bearer {KEY}"},
        {"authorization": f"bearer   {KEY} "},
        {"x-api-key": KEY},
        {"authorization": f"Bearer {KEY}", "x-api-key": KEY},
    ],
)
def test_a_key_comes_as_bearer_or_x_api_key(headers: dict[str, str]) -> None:
    assert identity.presented_key(headers) == KEY


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({}, None),
        ({"x-api-key": " "}, None),
        ({"authorization": f"Basic {KEY}"}, "invalid_request"),
        ({"authorization": "Bearer "}, "invalid_request"),
        ({"authorization": f"Bearer {KEY}", "x-api-key": OTHER}, "invalid_request"),
    ],
)
def test_a_missing_or_unclear_key_is_a_401_with_a_bearer_challenge(
    headers: dict[str, str], error: str | None
) -> None:
    with pytest.raises(AccessError) as refused:
        identity.presented_key(headers)
    assert refused.value.status == 401
    challenge = refused.value.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="predictor"')
    assert (f'error="{error}"' in challenge) if error else ("error=" not in challenge)


# -- the key cache ---------------------------------------------------------------------------


class Database:
    """Stands in for `authenticate`: the live keys, a switch to make it unreachable."""

    def __init__(self) -> None:
        self.live: dict[str, Identity] = {KEY: ACME}
        self.down = False
        self.asked = 0

    def authenticate(self, _pool: Any, key: str) -> Identity | None:
        self.asked += 1
        if self.down:
            raise psycopg.OperationalError("connection refused")
        return self.live.get(key)


@pytest.fixture
def database(monkeypatch: pytest.MonkeyPatch) -> Database:
    db = Database()
    monkeypatch.setattr(identity, "authenticate", db.authenticate)
    return db


@pytest.fixture
def keys(database: Database) -> Keys:
    k = Keys("postgresql://unused", cast(ConnectionPool[Any], None), ttl=30, stale=60, retry=1)
    k._set_listening(True)  # as the listener thread does once LISTEN succeeds
    return k


def test_a_checked_key_is_answered_from_memory_while_the_listener_is_up(
    keys: Keys, database: Database
) -> None:
    assert keys.cached(KEY) is None
    assert keys.check(KEY) == ACME
    assert keys.cached(KEY) == ACME
    assert database.asked == 1


def test_a_revocation_notice_drops_the_key_at_once(keys: Keys, database: Database) -> None:
    keys.check(KEY)
    keys.dropped(ACME.key_id)
    del database.live[KEY]
    assert keys.cached(KEY) is None
    assert keys.check(KEY) is None


def test_a_revocation_during_a_check_keeps_that_answer_out_of_memory(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    def answered_then_revoked(pool: Any, key: str) -> Identity | None:
        keys.dropped(ACME.key_id)  # the NOTIFY arrives while the query is in flight
        return ACME

    monkeypatch.setattr(identity, "authenticate", answered_then_revoked)
    assert keys.check(KEY) == ACME
    assert keys.cached(KEY) is None


def test_without_the_listener_every_request_asks_the_database(
    keys: Keys, database: Database
) -> None:
    keys.check(KEY)
    keys._set_listening(False)
    assert keys.cached(KEY) is None
    keys._set_listening(True)  # a reconnect may have missed notices: old checks do not count
    assert keys.cached(KEY) is None
    keys.check(KEY)
    assert keys.cached(KEY) == ACME


def test_a_cached_key_expires_after_its_ttl(keys: Keys) -> None:
    keys.ttl = 0.05
    keys.check(KEY)
    assert keys.cached(KEY) == ACME
    time.sleep(0.1)
    assert keys.cached(KEY) is None


def test_a_wrong_secret_for_a_cached_key_id_is_not_let_in(keys: Keys) -> None:
    keys.check(KEY)
    forged = KEY[:-1] + "C"
    assert keys.cached(forged) is None
    assert keys.check(forged) is None
    assert keys.cached(KEY) == ACME  # and the real key stays cached


def test_while_postgres_is_away_only_recently_checked_keys_work(
    keys: Keys, database: Database
) -> None:
    keys.check(KEY)
    keys._set_listening(False)
    database.down = True
    database.live[OTHER] = Identity("acme", OTHER[6:22], frozenset({"predict"}))
    assert keys.check(KEY) == ACME
    asked = database.asked
    assert keys.check(KEY) == ACME  # within `retry` of the failure the database is not asked
    assert database.asked == asked
    with pytest.raises(KeysUnavailableError):
        keys.check(OTHER)


def test_malformed_keys_never_reach_the_database(keys: Keys, database: Database) -> None:
    for key in ("", "nope", "mlops_xyz_abc", KEY + "x"):
        assert keys.check(key) is None
    assert database.asked == 0


def test_authorize_answers_401_403_and_503(keys: Keys, database: Database) -> None:
    def run(headers: dict[str, str], needed: set[str]) -> Identity:
        return asyncio.run(identity.authorize(keys, headers, frozenset(needed)))

    assert run({"x-api-key": KEY}, {"predict"}) == ACME
    with pytest.raises(AccessError) as refused:
        run({"x-api-key": KEY}, {"admin"})
    assert refused.value.status == 403
    assert 'error="insufficient_scope", scope="admin"' in refused.value.headers["www-authenticate"]
    with pytest.raises(AccessError) as refused:
        run({"x-api-key": OTHER}, {"predict"})
    assert refused.value.status == 401
    assert 'error="invalid_token"' in refused.value.headers["www-authenticate"]
    keys._set_listening(False)
    database.down = True
    with pytest.raises(AccessError) as refused:
        run({"x-api-key": OTHER}, {"predict"})
    assert refused.value.status == 503


# -- MLflow's webhook signature ---------------------------------------------------------------


def signed(secret: str, body: bytes, stamp: int | None = None) -> dict[str, str]:
    """The headers MLflow 3 sends with a delivery, signed by MLflow's own function."""
    stamp = int(time.time()) if stamp is None else stamp
    delivery = "7d1f4a52-3d2b-4d7e-9a8e-2f3c4b5a6d7e"
    signature = _generate_hmac_signature(secret, delivery, str(stamp), body.decode())
    return {
        "x-mlflow-signature": signature,
        "x-mlflow-timestamp": str(stamp),
        "x-mlflow-delivery-id": delivery,
    }


BODY = json.dumps({"entity": "model_version_alias", "action": "created", "data": {}}).encode()


def test_a_delivery_signed_by_mlflow_is_accepted() -> None:
    assert identity.verify_signature("s3cret", signed("s3cret", BODY), BODY) is None


@pytest.mark.parametrize(
    ("headers", "body", "named"),
    [
        (lambda: signed("other", BODY), BODY, "does not match"),
        (lambda: signed("s3cret", BODY), BODY.replace(b"created", b"deleted"), "does not match"),
        (lambda: signed("s3cret", BODY, stamp=int(time.time()) - 301), BODY, "within 300 s"),
        (dict, BODY, "X-MLflow-Signature"),
        (
            lambda: {**signed("s3cret", BODY), "x-mlflow-signature": "v2,abc"},
            BODY,
            "does not match",
        ),
    ],
    ids=["other-secret", "changed-body", "stale", "unsigned", "other-scheme"],
)
def test_a_forged_stale_or_unsigned_delivery_is_refused(
    headers: Callable[[], dict[str, str]], body: bytes, named: str
) -> None:
    """Headers are signed when the test runs (a run may start long after collection)."""
    problem = identity.verify_signature("s3cret", headers(), body)
    assert problem is not None
    assert named in problem
