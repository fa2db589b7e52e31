"""The demo's tenant pieces against an in-memory predictor: who sends what with which key,
and what the isolation lines say when the predictor does, or does not, keep tenants apart.

The real predictor and database are the e2e test's (tests/e2e/test_loop.py).
"""

from __future__ import annotations

import io
import urllib.error
import urllib.parse
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from typing import Any

import pandas as pd
import pytest

from models.generate import EXAMPLE_TENANTS, TARGET
from scripts import loop

pytestmark = pytest.mark.unit

KEYS = {"acme": "key-of-acme", "globex": "key-of-globex"}
SINCE = datetime(2026, 12, 1, tzinfo=UTC)


def _refuse(url: str, code: int) -> urllib.error.HTTPError:
    body = io.BytesIO(b'{"error": "not found"}')
    return urllib.error.HTTPError(url, code, "refused", Message(), body)


@dataclass
class FakePredictor:
    """The predictor's tenant rules in memory: the key decides the tenant.

    `isolated=False` plays a predictor that ignores keys; `readback=False` one without
    `GET /predictions` (the predictor before keys).
    """

    isolated: bool = True
    readback: bool = True
    page: int = 1000
    rows: list[tuple[str, str]] = field(default_factory=list)  # (tenant, request id)
    labels: list[tuple[str, str, str]] = field(default_factory=list)  # (key, request id, label)

    def tenant(self, key: str | None) -> str:
        return next(t for t, k in KEYS.items() if k == key)

    def visible(self, key: str | None) -> list[str]:
        me = self.tenant(key)
        return [rid for t, rid in self.rows if t == me or not self.isolated]

    def __call__(
        self, url: str, body: dict[str, Any] | None = None, key: str | None = None, **_: Any
    ) -> Any:
        parts = urllib.parse.urlsplit(url)
        if parts.path == "/predict":
            assert body is not None
            ids = [str(uuid.uuid4()) for _ in body["records"]]
            self.rows += [(self.tenant(key), rid) for rid in ids]
            return {"predictions": [{"request_id": rid} for rid in ids], "model_version": "1"}
        if parts.path == "/feedback":
            assert body is not None
            if body["request_id"] not in self.visible(key):
                raise _refuse(url, 404)
            self.labels.append((str(key), body["request_id"], body["label"]))
            return {"accepted": True}
        if parts.path == "/predictions" and self.readback:
            query = dict(urllib.parse.parse_qsl(parts.query))
            assert query["start"] == SINCE.isoformat()
            seen = self.visible(key)
            at = int(query.get("cursor", 0))
            limit = min(int(query["limit"]), self.page)
            more = at + limit < len(seen)
            return {
                "tenant_id": self.tenant(key),
                "rows": [{"request_id": rid} for rid in seen[at : at + limit]],
                "next_cursor": str(at + limit) if more else None,
            }
        raise _refuse(url, 404)


@pytest.fixture
def frames() -> dict[str, pd.DataFrame]:
    return {t.id: t.traffic(30) for t in EXAMPLE_TENANTS}


@pytest.fixture
def features(frames: dict[str, pd.DataFrame]) -> list[str]:
    return [c for c in frames["acme"].columns if c not in ("customer_id", TARGET)]


def sent(
    fake: FakePredictor,
    frames: dict[str, pd.DataFrame],
    features: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> loop.Traffic:
    monkeypatch.setattr(loop, "_request", fake)
    monkeypatch.setattr(loop, "wait_logged", lambda *a, **k: None)
    return loop.Traffic.send("http://predictor", frames, features, KEYS, "postgresql://unused")


def isolation(fake: FakePredictor, traffic: loop.Traffic) -> loop.Isolation:
    return loop.check_isolation(
        "http://predictor",
        ("acme", traffic.ids["acme"]),
        ("globex", KEYS["globex"], traffic.ids["globex"]),
        SINCE,
    )


def test_each_tenant_sends_its_own_rows_with_its_own_key(
    frames: dict[str, pd.DataFrame], features: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakePredictor()
    traffic = sent(fake, frames, features, monkeypatch)
    assert traffic.total == 60
    assert traffic.split == "30 from acme, 30 from globex, each with its own key"
    for tenant in KEYS:
        assert traffic.ids[tenant] == [rid for t, rid in fake.rows if t == tenant]


def test_labels_go_back_with_the_key_of_the_tenant_that_asked(
    frames: dict[str, pd.DataFrame],
    features: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakePredictor()
    traffic = sent(fake, frames, features, monkeypatch)
    assert traffic.label("http://predictor", KEYS, TARGET, 0.5) == 30
    owner = dict((rid, t) for t, rid in fake.rows)
    assert {KEYS[owner[rid]] == key for key, rid, _ in fake.labels} == {True}
    truth = {
        traffic.ids[t][i]: str(df.loc[i, TARGET]) for t, df in frames.items() for i in df.index
    }
    assert all(truth[rid] == label for _, rid, label in fake.labels)


def test_isolation_lines_say_globex_can_neither_label_nor_see_acmes_predictions(
    frames: dict[str, pd.DataFrame], features: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakePredictor(page=7)  # several pages: the cursor is followed to the end
    result = isolation(fake, sent(fake, frames, features, monkeypatch))
    assert result.holds
    assert (result.feedback_status, result.read_status) == (404, 200)
    assert (result.own_rows, result.owner_rows, result.foreign_rows) == (30, 0, 0)
    (label, labelled_held), (see, seen_held) = result.lines()
    assert labelled_held
    assert seen_held
    assert "HTTP 404" in label
    assert "globex cannot label acme's predictions" in label
    assert "30 of globex's own rows, 0 of acme's 30" in see
    assert "globex cannot see acme's predictions" in see
    assert fake.labels == []


def test_isolation_lines_say_so_loudly_when_the_predictor_ignores_keys(
    frames: dict[str, pd.DataFrame], features: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakePredictor(isolated=False)
    result = isolation(fake, sent(fake, frames, features, monkeypatch))
    assert not result.holds
    assert not result.cannot_label
    assert result.owner_rows == 30
    (label, labelled_held), (see, seen_held) = result.lines()
    assert not labelled_held
    assert not seen_held
    assert "NOT ISOLATED: globex could label acme's predictions" in label
    assert "NOT ISOLATED: globex sees rows not its own" in see


def test_reading_back_nothing_is_not_counted_as_isolated(
    frames: dict[str, pd.DataFrame], features: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakePredictor()
    traffic = sent(fake, frames, features, monkeypatch)
    fake.rows.clear()  # a predictor that logged nothing, or a read that finds nothing
    result = isolation(fake, traffic)
    assert not result.cannot_see
    see, held = result.lines()[1]
    assert not held
    assert "globex read back none of its own rows: this proves nothing" in see


def test_a_predictor_without_readback_is_not_counted_as_isolated(
    frames: dict[str, pd.DataFrame], features: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakePredictor(readback=False)
    result = isolation(fake, sent(fake, frames, features, monkeypatch))
    assert result.cannot_label
    assert not result.cannot_see
    see, held = result.lines()[1]
    assert not held
    assert "HTTP 404" in see
    assert "could not read back its own rows" in see
