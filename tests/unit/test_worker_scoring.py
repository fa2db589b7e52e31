"""The worker's scoring step on a real small model: one batch, poison chunks set apart."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from common.params import DataParams, Params
from common.registry.served import ServedModel, from_dir
from common.store.jobs import Chunk, request_id
from services.worker.scoring import reason, score
from services.worker.worker import backoff
from tests.unit.test_predict import as_bundle, as_records, fitted, save_model_dir, training_rows

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def served(
    params: Params, data_params: DataParams, tmp_path_factory: pytest.TempPathFactory
) -> ServedModel:
    rows = training_rows()
    path = tmp_path_factory.mktemp("worker") / "model"
    save_model_dir(fitted(rows, data_params, params), data_params, rows, path)
    return from_dir(as_bundle(path), "churn-test").load()


@pytest.fixture(scope="module")
def good(data_params: DataParams) -> list[dict[str, Any]]:
    return as_records(training_rows().head(6), data_params)


def chunk(records: list[dict[str, Any]], number: int = 0, first: int = 0) -> Chunk:
    job = str(uuid.uuid4())
    return Chunk(number + 1, 1, datetime.now(UTC), "acme", job, number, first, records)


class Anything(BaseModel):
    """Lets every record through, so the scorer itself meets what validation would stop."""

    model_config = ConfigDict(extra="allow")


def test_answers_have_the_predict_shape_and_the_jobs_request_ids(
    served: ServedModel, good: list[dict[str, Any]]
) -> None:
    parts = [chunk(good[:4]), chunk(good[4:], number=1, first=4)]
    scored, failed = score(served, parts, record=served.record)
    assert failed == []
    assert [len(s.answers) for s in scored] == [4, 2]
    second = scored[1]
    assert [a["request_id"] for a in second.answers] == [
        request_id(parts[1].job_id, i) for i in (4, 5)
    ]
    assert set(second.answers[0]) == {
        "request_id",
        "predicted_class",
        "probabilities",
        "model_name",
        "model_version",
        "variant",
    }
    assert [p.request_id for p in second.predictions] == [a["request_id"] for a in second.answers]
    assert {p.tenant_id for p in second.predictions} == {"acme"}
    assert all(p.latency_ms >= 0 for p in second.predictions)


def test_a_chunk_failing_validation_is_set_apart_with_a_one_line_reason(
    served: ServedModel, good: list[dict[str, Any]]
) -> None:
    bad = chunk([good[0], {**good[1], "tenure_months": "a lot"}])
    fine = chunk(good[:3])
    scored, failed = score(served, [fine, bad], record=served.record)
    assert [s.chunk for s in scored] == [fine]
    (failure,) = failed
    assert failure.chunk is bad
    assert failure.reason.startswith("ValidationError")
    assert "tenure_months" in failure.reason
    assert "\n" not in failure.reason


def test_a_chunk_crashing_the_scorer_does_not_sink_the_others(
    served: ServedModel, good: list[dict[str, Any]]
) -> None:
    poison = chunk([{"nothing": "useful"}])
    fine = chunk(good[:2])
    scored, failed = score(served, [fine, poison], record=Anything)
    assert [s.chunk for s in scored] == [fine]
    assert [f.chunk for f in failed] == [poison]


def test_reasons_are_one_bounded_line() -> None:
    text = reason(ValueError("first line\n  second " + "x" * 1000))
    assert text.startswith("ValueError: first line second x")
    assert len(text) == 500


def test_failed_chunks_back_off_exponentially_up_to_a_minute() -> None:
    assert [backoff(n) for n in (1, 2, 3, 7, 30)] == [1, 2, 4, 60, 60]
