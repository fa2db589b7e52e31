"""The shadow: a copy of the traffic scored after the answer, logged, never returned.

`/predict` hands each answered request's records to `Shadow.offer` (no waiting: a bounded
queue); one background thread scores them with the `shadow` alias's model and logs its
predictions with variant `shadow` and request ids of their own. When the shadow falls
behind and the queue is full, the copy is dropped and counted, so a slow shadow never
slows the answers.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from common.answers import answer_records
from common.registry.served import ServedModel
from common.store import Item, ServingError

log = logging.getLogger("predictor")

QUEUE_REQUESTS = 1000
"""Requests waiting for the shadow at most; past it a copy is dropped (and counted)."""
BATCH_COPIES = 64
"""Queued copies the shadow scores in one call, at most."""


@dataclass(frozen=True)
class _Copy:
    tenant: str
    model: ServedModel
    rows: tuple[dict[str, Any], ...]


class Shadow:
    """One thread scoring copies of answered requests with the shadow model; each row
    (a prediction, or the serving error of a copy it failed to score) goes to `submit`."""

    def __init__(
        self,
        submit: Callable[[Item], None],
        *,
        on_drop: Callable[[], None] = lambda: None,
        size: int = QUEUE_REQUESTS,
    ) -> None:
        self._submit = submit
        self._on_drop = on_drop
        self._queue: queue.Queue[_Copy | None] = queue.Queue(maxsize=size)
        self.dropped = 0
        self.scored = 0
        self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
        self._thread.start()

    def offer(self, tenant: str, model: ServedModel, rows: Sequence[dict[str, Any]]) -> bool:
        """Queue a copy of `rows` for `model`; False (dropped, counted) if the queue is full."""
        try:
            self._queue.put_nowait(_Copy(tenant, model, tuple(dict(r) for r in rows)))
        except queue.Full:
            self.dropped += 1
            self._on_drop()
            return False
        return True

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float = 5.0) -> None:
        """Stop after the copies queued now (what `timeout` allows)."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        """Score what is queued, up to BATCH_COPIES copies a model in one call: behind under
        load, the shadow catches up for a fraction of the CPU that one call a copy costs."""
        while (first := self._queue.get()) is not None:
            batch, stopping = [first], False
            while len(batch) < BATCH_COPIES:
                try:
                    copy = self._queue.get_nowait()
                except queue.Empty:
                    break
                if copy is None:
                    stopping = True
                    break
                batch.append(copy)
            groups: dict[tuple[str, int], list[_Copy]] = {}
            for copy in batch:
                groups.setdefault((copy.tenant, id(copy.model)), []).append(copy)
            for copies in groups.values():
                try:
                    self._score(copies)
                except Exception:  # the one shadow thread stays alive whatever happens
                    log.exception("shadow: unexpected error")
            if stopping:
                return

    def _score(self, copies: list[_Copy]) -> None:
        """Score copies of one tenant for one model; a failing batch copy by copy, so each
        failure is its own serving error."""
        model, tenant = copies[0].model, copies[0].tenant
        rows = [row for copy in copies for row in copy.rows]
        start = time.perf_counter()
        try:
            scored = model.scorer.predict(rows)
        except Exception as exc:
            if len(copies) > 1:
                for copy in copies:
                    self._score([copy])
                return
            self._submit(
                ServingError.of(
                    exc,
                    tenant_id=tenant,
                    model_name=model.name,
                    model_version=model.version,
                    variant="shadow",
                    ts=datetime.now(UTC),
                )
            )
            return
        elapsed = time.perf_counter() - start
        _, logged = answer_records(
            model,
            rows,
            scored,
            [str(uuid.uuid4()) for _ in rows],
            tenant=tenant,
            now=datetime.now(UTC),
            per_row_ms=elapsed * 1000 / len(rows),
            variant="shadow",
        )
        for prediction in logged:
            self._submit(prediction)
        self.scored += len(rows)
