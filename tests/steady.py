"""A steady client of the predictor and the check of what it was told against the log.

`SteadyClient` sends `/predict` at a fixed rate (spread over a few threads), `/feedback`
for a share of the answered predictions and small `POST /jobs` at their own rate, each on
its own thread, and records every acknowledged id (a 2xx answer) and every failure with
its time. A drill marks when a process was down (`with client.outage("postgres"): ...`);
`check()` then compares the acknowledged ids with the rows in PostgreSQL (as the owner,
which row-level security does not hide rows from): acknowledged but missing, logged more
than once, and failures outside every outage window. Used by the outage drills
(tests/integration/test_drills.py) and the soak benchmark (benchmarks/soak.py).
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
import psycopg

FEEDBACK_LABEL = "1"
"""Any class of the churn model does; the check only asks that the label was kept."""


@dataclass(frozen=True)
class Outcome:
    """One request: when it was sent (seconds since the client started), what it was,
    its status (0: no answer at all) and how long it took."""

    at: float
    kind: str  # predict | feedback | job
    status: int
    seconds: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def server_error(self) -> bool:
        """A 5xx, or no answer at all."""
        return self.status == 0 or self.status >= 500


@dataclass(frozen=True)
class Window:
    """A process that was down: from `start` until it answered again at `end`."""

    name: str
    start: float
    end: float


@dataclass
class Rates:
    """Requests per second of each kind; feedback is a share of answered predictions."""

    predict: float = 20.0
    records_per_predict: int = 1
    """1: a record alone as the body; more: a list of them."""
    feedback_share: float = 0.3
    jobs: float = 1.0
    records_per_job: int = 5
    threads: int = 4
    """Threads sending /predict; each waits for its answer, so this bounds concurrency."""


@dataclass
class Acknowledged:
    """Every id the service acknowledged, in the order it did."""

    predictions: list[str] = field(default_factory=list)
    feedback: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)


class SteadyClient:
    """Traffic at fixed rates on threads of its own until `stop()` (or the `with` ends)."""

    def __init__(
        self,
        url: str,
        key: str,
        records: Sequence[dict[str, Any]],
        rates: Rates | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.headers = {"authorization": f"Bearer {key}"}
        self.records = list(records)
        self.rates = rates or Rates()
        self.timeout = timeout
        self.acked = Acknowledged()
        self.outcomes: list[Outcome] = []
        self.windows: list[Window] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._labels: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._t0 = time.monotonic()

    def now(self) -> float:
        """Seconds since the client started: the clock of outcomes and windows."""
        return time.monotonic() - self._t0

    def start(self) -> SteadyClient:
        self._t0 = time.monotonic()
        senders = [
            *(
                threading.Thread(target=self._predicts, args=(n,), daemon=True)
                for n in range(self.rates.threads)
            ),
            threading.Thread(target=self._feedbacks, daemon=True),
            threading.Thread(target=self._jobs, daemon=True),
        ]
        self._threads = senders
        for thread in senders:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)

    def __enter__(self) -> SteadyClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @contextmanager
    def outage(self, name: str) -> Iterator[None]:
        """Mark `name` down from entering until the block ends (when it is back)."""
        start = self.now()
        try:
            yield
        finally:
            with self._lock:
                self.windows.append(Window(name, start, self.now()))

    def pause(self, seconds: float) -> None:
        """Let traffic run for `seconds` (a phase of a drill)."""
        self._stop.wait(seconds)

    def snapshot(self) -> tuple[Acknowledged, list[Outcome], list[Window]]:
        """Copies of what was acknowledged, every outcome and the windows so far."""
        with self._lock:
            acked = Acknowledged(
                list(self.acked.predictions), list(self.acked.feedback), list(self.acked.jobs)
            )
            return acked, list(self.outcomes), list(self.windows)

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def _paced(self, per_second: float, offset: float = 0.0) -> Iterator[None]:
        """Yield at `per_second` until stopped; late ticks are sent at once, not skipped."""
        if per_second <= 0:
            return
        interval = 1.0 / per_second
        due = time.monotonic() + offset
        while not self._stop.is_set():
            wait = due - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                return
            yield
            due += interval

    def _send(
        self, client: httpx.Client, kind: str, path: str, body: dict[str, Any], **headers: str
    ) -> tuple[Outcome, dict[str, Any]]:
        at = self.now()
        start = time.perf_counter()
        try:
            resp = client.post(f"{self.url}{path}", json=body, headers=headers)
        except httpx.HTTPError as exc:
            took = time.perf_counter() - start
            return Outcome(at, kind, 0, took, f"{type(exc).__name__}: {exc}"), {}
        took = time.perf_counter() - start
        ok = 200 <= resp.status_code < 300
        try:
            payload = resp.json() if ok else {}
        except ValueError:
            payload = {}
        detail = "" if ok else resp.text[:200]
        return Outcome(at, kind, resp.status_code, took, detail), payload

    def _client(self) -> httpx.Client:
        return httpx.Client(timeout=self.timeout, headers=self.headers)

    def _predicts(self, n: int) -> None:
        per_thread = self.rates.predict / self.rates.threads
        size = self.rates.records_per_predict
        records = itertools.cycle(self.records[n:] + self.records[:n])
        share = self.rates.feedback_share
        pick = random.Random(n)
        with self._client() as client:
            for _ in self._paced(per_thread, offset=n / max(self.rates.predict, 1e-9)):
                batch = [next(records) for _ in range(size)]
                payload = {"records": batch[0] if size == 1 else batch}
                outcome, body = self._send(client, "predict", "/predict", payload)
                ids = [answer["request_id"] for answer in body.get("predictions", [])]
                with self._lock:
                    self.outcomes.append(outcome)
                    self.acked.predictions.extend(ids)
                for request_id in ids:
                    if pick.random() < share:
                        self._labels.put(request_id)

    def _feedbacks(self) -> None:
        with self._client() as client:
            while not self._stop.is_set():
                try:
                    request_id = self._labels.get(timeout=0.2)
                except queue.Empty:
                    continue
                body = {"request_id": request_id, "label": FEEDBACK_LABEL}
                outcome, _ = self._send(client, "feedback", "/feedback", body)
                with self._lock:
                    self.outcomes.append(outcome)
                    if outcome.ok:
                        self.acked.feedback.append(request_id)

    def _jobs(self) -> None:
        size = self.rates.records_per_job
        with self._client() as client:
            for n in self._paced(self.rates.jobs):
                del n
                records = [self.records[i % len(self.records)] for i in range(size)]
                key = str(uuid.uuid4())
                outcome, body = self._send(
                    client, "job", "/jobs", {"records": records}, **{"Idempotency-Key": key}
                )
                with self._lock:
                    self.outcomes.append(outcome)
                    if outcome.ok and "job_id" in body:
                        self.acked.jobs.append(str(body["job_id"]))


@dataclass(frozen=True)
class Check:
    """Acknowledged ids against logged rows, and failures against outage windows."""

    acknowledged: dict[str, int]
    logged: dict[str, int]
    missing: dict[str, list[str]]
    duplicated: dict[str, list[str]]
    failures: list[Outcome]
    stray_failures: list[Outcome]
    """Failures outside every window (plus its settle time)."""

    @property
    def clean(self) -> bool:
        return (
            not any(self.missing.values())
            and not any(self.duplicated.values())
            and not self.stray_failures
        )

    def summary(self) -> str:
        kinds = ", ".join(
            f"{kind}: {self.acknowledged[kind]} acknowledged, {self.logged[kind]} logged, "
            f"{len(self.missing[kind])} missing, {len(self.duplicated[kind])} duplicated"
            for kind in self.acknowledged
        )
        strays = "; ".join(
            f"{o.kind} {o.status} at {o.at:.1f} s ({o.detail[:80]})"
            for o in self.stray_failures[:5]
        )
        return (
            f"{kinds}; {len(self.failures)} failed requests, "
            f"{len(self.stray_failures)} outside outages{': ' + strays if strays else ''}"
        )


_TABLES = {
    "predictions": ("predictions", "request_id"),
    "feedback": ("feedback", "request_id"),
    "jobs": ("jobs", "id"),
}


def _duplicates(ids: Sequence[str]) -> list[str]:
    return sorted(i for i, n in Counter(ids).items() if n > 1)


def _counts(
    conn: psycopg.Connection[Any], table: str, column: str, ids: list[str]
) -> dict[str, int]:
    """How many rows of `table` hold each of `ids` (absent ids: none)."""
    rows = conn.execute(
        f"SELECT {column}::text, count(*) FROM {table} "  # names from _TABLES only
        f"WHERE {column} = ANY(%s::uuid[]) GROUP BY 1",
        (ids,),
    ).fetchall()
    return {str(i): int(n) for i, n in rows}


def check(
    client: SteadyClient,
    admin_url: str,
    *,
    settle: float = 5.0,
    drain: float = 60.0,
) -> Check:
    """What `client` was told against the log, once the log has drained.

    Rows reach PostgreSQL off the request path, so missing ids are looked up again until
    none is missing or `drain` seconds have passed. A failure counts as stray unless it
    was in flight during a window or up to `settle` seconds after it ended.
    """
    acked, outcomes, windows = client.snapshot()
    wanted = {"predictions": acked.predictions, "feedback": acked.feedback, "jobs": acked.jobs}
    deadline = time.monotonic() + drain
    with psycopg.connect(admin_url, autocommit=True) as conn:
        while True:
            counts = {
                kind: _counts(conn, *_TABLES[kind], sorted(set(ids)))
                for kind, ids in wanted.items()
            }
            missing = {
                kind: [i for i in dict.fromkeys(ids) if i not in counts[kind]]
                for kind, ids in wanted.items()
            }
            if not any(missing.values()) or time.monotonic() > deadline:
                break
            time.sleep(1.0)
    duplicated = {
        kind: sorted(set(_duplicates(ids)) | {i for i, n in counts[kind].items() if n > 1})
        for kind, ids in wanted.items()
    }
    failures = [o for o in outcomes if not o.ok]
    stray = [
        o
        for o in failures
        if not any(o.at <= w.end + settle and o.at + o.seconds >= w.start for w in windows)
    ]
    return Check(
        acknowledged={kind: len(ids) for kind, ids in wanted.items()},
        logged={kind: sum(counts[kind].values()) for kind in wanted},
        missing=missing,
        duplicated=duplicated,
        failures=failures,
        stray_failures=stray,
    )


def serve_family(url: str) -> tuple[psutil.Process, list[psutil.Process]]:
    """The `bentoml serve` process answering `url` and its API workers (its descendants
    started with a `--worker-id`; the arbiter starts a new one in place of one that died)."""
    port = url.rstrip("/").rsplit(":", 1)[1]
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "serve" in cmdline and "--port" in cmdline and port in cmdline:
            workers = []
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    if any("worker-id" in part for part in child.cmdline()):
                        workers.append(child)
            return proc, workers
    raise LookupError(f"no `bentoml serve` process on port {port}")
