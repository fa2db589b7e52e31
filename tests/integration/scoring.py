"""Scoring a job's chunks in the test process, as a worker would, with a fixed answer.

For tests of the jobs store and the job API that need finished jobs without a model: each
record is answered class "1" (0.25 / 0.75) by `model_name` v1, and logged as /predict logs.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg

from common.store import Prediction, connect, create_staging, jobs

PROBABILITIES = {"0": 0.25, "1": 0.75}


def score(conn: psycopg.Connection[Any], chunk: jobs.Chunk, model_name: str) -> jobs.Job | None:
    """Write `chunk`'s answers, shaped as /predict's; the job if this ended it. `conn` has
    had `create_staging`."""
    now = datetime.now(UTC)
    answers, rows = [], []
    for rid, record in zip(chunk.request_ids(), chunk.records, strict=True):
        answers.append(
            {
                "request_id": rid,
                "predicted_class": "1",
                "probabilities": PROBABILITIES,
                "model_name": model_name,
                "model_version": "1",
            }
        )
        rows.append(
            Prediction(rid, now, model_name, "1", record, "1", PROBABILITIES, 0.1, chunk.tenant_id)
        )
    return jobs.complete(conn, chunk, answers, rows, model_name=model_name, model_version="1")


def drain(url: str, tenant: str, model_name: str) -> list[jobs.Job]:
    """Score every visible chunk of `tenant` (logging in with `url`); the jobs that ended."""
    ended = []
    with connect(url) as conn:
        create_staging(conn)
        while chunks := jobs.read(conn, tenant, visibility_timeout=30, limit=8):
            ended += [job for chunk in chunks if (job := score(conn, chunk, model_name))]
    return ended
