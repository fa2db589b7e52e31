"""Score a tenant's chunks in one batch; a chunk that fails is set apart, not the batch.

Pure: no database. Each chunk's records are validated as /predict validates them, the valid
chunks are scored in one `scorer.predict` call and, if that raises, chunk by chunk, so one
poison chunk cannot sink the others. Answers have /predict's shape; request ids come from
the job and the record's position, the same on every redelivery.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from common.answers import answer_records
from common.registry.served import ServedModel
from common.store import Prediction
from common.store.jobs import Chunk
from models.predict import out_of_range, validate_records

MAX_REASON = 500
"""Characters of an exception kept as a chunk's failure reason."""


@dataclass(frozen=True)
class Scored:
    """A chunk's answers and its rows for the prediction log."""

    chunk: Chunk
    answers: list[dict[str, Any]]
    predictions: list[Prediction]


@dataclass(frozen=True)
class Failed:
    """A chunk that could not be validated, scored or written, and why (one line)."""

    chunk: Chunk
    reason: str


def reason(exc: BaseException) -> str:
    """`Type: message` on one line, at most MAX_REASON characters."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:MAX_REASON]


def score(
    served: ServedModel,
    chunks: Sequence[Chunk],
    *,
    record: type[BaseModel],
    flag_range: bool = False,
) -> tuple[list[Scored], list[Failed]]:
    """Validate each chunk against `record`, score the valid ones together.

    `flag_range` (PREDICT_OUT_OF_RANGE=flag) adds /predict's `warnings` to each answer.
    """
    start = time.perf_counter()
    valid: list[tuple[Chunk, list[dict[str, Any]]]] = []
    failed: list[Failed] = []
    for chunk in chunks:
        try:
            valid.append(
                (chunk, validate_records(record, chunk.records, max_batch=len(chunk.records)))
            )
        except Exception as exc:  # whatever a record makes validation raise
            failed.append(Failed(chunk, reason(exc)))
    results = _predict(served, valid, failed)
    if not results:
        return [], failed
    now = datetime.now(UTC)
    per_row_ms = (time.perf_counter() - start) * 1000 / sum(len(rows) for _, rows, _ in results)
    scored = [
        _answer(served, chunk, rows, labels, now=now, per_row_ms=per_row_ms, flag_range=flag_range)
        for chunk, rows, labels in results
    ]
    return scored, failed


def _predict(
    served: ServedModel,
    valid: list[tuple[Chunk, list[dict[str, Any]]]],
    failed: list[Failed],
) -> list[tuple[Chunk, list[dict[str, Any]], list[Any]]]:
    """Each valid chunk with its scorer results: one call for all, else one per chunk."""
    if not valid:
        return []
    try:
        together = served.scorer.predict([row for _, rows in valid for row in rows])
    except Exception:  # find the chunk(s) to blame; the others still score
        together = None
    out = []
    at = 0
    for chunk, rows in valid:
        if together is not None:
            out.append((chunk, rows, together[at : at + len(rows)]))
            at += len(rows)
            continue
        try:
            out.append((chunk, rows, served.scorer.predict(rows)))
        except Exception as exc:
            failed.append(Failed(chunk, reason(exc)))
    return out


def _answer(
    served: ServedModel,
    chunk: Chunk,
    rows: list[dict[str, Any]],
    results: list[Any],
    *,
    now: datetime,
    per_row_ms: float,
    flag_range: bool,
) -> Scored:
    flagged = out_of_range(served.scorer.schema, rows) if flag_range else None
    said, logged = answer_records(
        served,
        rows,
        results,
        chunk.request_ids(),
        tenant=chunk.tenant_id,
        now=now,
        per_row_ms=per_row_ms,
        flagged=flagged,
    )
    return Scored(chunk, said, logged)
