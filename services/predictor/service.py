"""The BentoML predictor: serves `models:/<name>@champion`, logs every prediction to PostgreSQL.

A tenant with a model of its own (`<name>.<tenant>@champion`) is answered by it, loaded on
its first request; every other tenant by the shared model. Each request is answered by one
variant of that model (`common.registry.variants`): the champion, or the `challenger` for
the share of entity keys its weight gives (sticky by tenant and `X-Entity-Key`, else the
request's first request id); a challenger that fails answers through the champion and
leaves a `serving_errors` row. A `shadow` scores a copy afterwards (services.predictor.shadow).

Thin by design: scoring and request validation live in models.predict, the registry
following in common.registry.runtime, the prediction log in common.store, who is
calling (API keys, tenants, scopes) in services.predictor.identity, checked by the guard
before a request reaches these methods.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal, NotRequired, cast

import bentoml
import psycopg
from fastapi import FastAPI, Header, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from psycopg_pool import PoolTimeout
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.responses import JSONResponse
from typing_extensions import TypedDict

from common.answers import answer_records
from common.callbacks import allowed_hosts, check_url
from common.registry.runtime import ModelRuntime, ModelUnavailableError
from common.registry.served import ServedModel
from common.registry.variants import ENTITY_HEADER
from common.settings import get_settings
from common.store import (
    Feedback,
    Item,
    Prediction,
    PredictionLog,
    ServingError,
    jobs,
    migrate,
    pool,
    prediction_exists,
)
from common.store.log import LogRefusedError, LogStats
from common.store.readback import MAX_PAGE, read_page
from common.store.tenants import Identity
from models.predict import out_of_range, validate_records
from services.predictor import identity
from services.predictor.guard import RequestGuard
from services.predictor.openapi import (
    IDEMPOTENCY_KEY,
    JOB_PAGE_MAX,
    PUBLISHED,
    Contract,
    FeedbackBody,
    JobAccepted,
    JobStatus,
    LoggedPrediction,
    MlflowEvent,
    PredictBody,
    PredictionsPage,
)
from services.predictor.shadow import Shadow

log = logging.getLogger("predictor")

FEEDBACK_LOOKUPS = 5
"""A prediction reaches PostgreSQL within a flush interval (0.2 s); feedback may come sooner."""

INLINE_ROWS = 64
"""Batches up to this size are scored on the event loop; larger ones on a worker thread."""

MAX_BODY_BYTES = 8 * 1024 * 1024
"""Larger request bodies get a 413 before they are parsed (PREDICT_MAX_BATCH bounds records)."""

BUNDLE = "predictor-model"
"""Tag of the champion copied into the Bento at build time (services.predictor.package)."""

PREDICTIONS = bentoml.metrics.Counter(
    name="predictor_predictions",
    documentation="Predictions made (a shadow's too), by model version, variant and class",
    labelnames=["model_version", "variant", "predicted_class"],
)
"""No model name label: /metrics needs no key, and `<MODEL_NAME>.<tenant>` names tenants."""
LATENCY = bentoml.metrics.Histogram(
    name="predictor_prediction_latency_seconds",
    documentation="Time to validate and score one /predict request, by the variant answering",
    labelnames=["model_version", "variant"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
SERVING_ERRORS = bentoml.metrics.Counter(
    name="predictor_serving_errors",
    documentation="Requests a variant failed to score (a challenger's: the champion answered)",
    labelnames=["model_version", "variant"],
)
SHADOW_DROPPED = bentoml.metrics.Counter(
    name="predictor_shadow_dropped",
    documentation="Copies of requests the shadow skipped: it had fallen behind (queue full)",
)
QUEUE_DEPTH = bentoml.metrics.Gauge(
    name="predictor_log_queue_depth",
    documentation="Prediction-log rows written ahead, not yet in PostgreSQL (= backlog rows)",
    multiprocess_mode="livesum",
)
LOG_BACKLOG_BYTES = bentoml.metrics.Gauge(
    name="predictor_log_backlog_bytes",
    documentation="Bytes of prediction-log rows written ahead, not yet in PostgreSQL",
    multiprocess_mode="livesum",
)
LOG_FSYNC_LAG = bentoml.metrics.Gauge(
    name="predictor_log_fsync_lag_seconds",
    documentation="Age of the oldest prediction-log line not yet fsynced (0: all synced)",
    multiprocess_mode="livemax",
)
LOG_COUNTERS = {
    name: bentoml.metrics.Counter(name=f"predictor_log_{name}", documentation=doc)
    for name, doc in {
        "written_rows": "Prediction-log rows written ahead before their answer",
        "written_bytes": "Prediction-log bytes written ahead before their answer",
        "committed_rows": "Prediction-log rows committed to PostgreSQL (replays included)",
        "committed_bytes": "Prediction-log bytes committed to PostgreSQL or set aside",
        "rejected_rows": "Prediction-log rows PostgreSQL refused as data (in *.rejected files)",
        "refused_rows": "Rows not written ahead (disk full, I/O error, backlog full): 503",
        "write_failures": "Failed writes or fsyncs of the prediction log's write-ahead files",
    }.items()
}
"""Deltas of `PredictionLog.stats()` (services.predictor.service._LogMetrics)."""
LOG_RETRY = "the prediction log cannot keep this request now ({}): nothing was recorded; retry"
JOBS_ACCEPTED = bentoml.metrics.Counter(
    name="predictor_jobs_accepted",
    documentation="Jobs recorded and queued by POST /jobs (an Idempotency-Key's replays not)",
)
"""No tenant label: /metrics needs no key (the workers' queue depths are per tenant)."""
SWAPS = bentoml.metrics.Counter(
    name="predictor_model_swaps", documentation="Times the served model version changed"
)
REGISTRY_UP = bentoml.metrics.Gauge(
    name="predictor_registry_up",
    documentation="1 when the last registry check succeeded",
    multiprocess_mode="livemin",
)
SERVED_VERSION = bentoml.metrics.Gauge(
    name="predictor_served_model_version",
    documentation="The version of the shared model each worker serves",
    multiprocess_mode="livemax",
)
REFUSED_VERSIONS = bentoml.metrics.Gauge(
    name="predictor_refused_model_versions",
    documentation="Model versions a worker refused to load: unsealed or changed after "
    "registration (names and reasons: GET /model)",
    multiprocess_mode="livemax",
)
TENANT_MODELS = bentoml.metrics.Gauge(
    name="predictor_tenant_models_loaded",
    documentation="Tenants' own models loaded, per worker (at most MODEL_CACHE_SIZE)",
    multiprocess_mode="livesum",
)


AnsweringVariant = Literal["champion", "challenger"]
"""A shadow's output never reaches a client."""


class Answer(TypedDict):
    """One record's prediction."""

    request_id: str
    predicted_class: str
    probabilities: dict[str, float]
    model_name: str
    model_version: str
    variant: AnsweringVariant
    warnings: NotRequired[list[str]]  # PREDICT_OUT_OF_RANGE=flag: values outside the range


class Predictions(TypedDict):
    tenant_id: str  # the caller's, from its key
    model_name: str
    model_version: str
    variant: AnsweringVariant  # which alias answered: sticky per tenant and X-Entity-Key
    predictions: list[Answer]


class FeedbackAccepted(TypedDict):
    tenant_id: str
    request_id: str
    label: str
    accepted: bool


class WebhookAnswer(TypedDict):
    status: str
    entity: str
    action: str


def _error(status: int, message: str) -> JSONResponse:
    """A 4xx with the documented body; BentoML's own wraps it in a list (1.4)."""
    return JSONResponse({"error": message}, status_code=status)


def _answered(ctx: bentoml.Context, response: JSONResponse) -> JSONResponse:
    """`response` from an API that takes `ctx`: BentoML sends ctx's status, not the response's."""
    ctx.response.status_code = response.status_code
    return response


READBACK_PARAMETERS = frozenset({"start", "end", "model_version", "limit", "cursor"})
JOB_PARAMETERS = frozenset({"offset", "limit"})
JOB_ERRORS_SHOWN = 20
"""A job's 400 names at most this many bad fields (100,000 bad records make one error)."""
JOB_STATEMENT_TIMEOUT = 60.0
"""Seconds a job's insert may take: 100,000 records are ~30 MB of queue messages."""


class _JobInput(BaseModel):
    """POST /jobs as parsed: `records` are then validated as /predict's are."""

    model_config = ConfigDict(extra="forbid")

    records: Any
    callback_url: str | None = None


class JobRefusedError(Exception):
    """A job request answered with a 400 naming the field (nothing was queued)."""

    def __init__(self, message: str, detail: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"error": self.message}
        if self.detail is not None:
            body["detail"] = self.detail
        return JSONResponse(body, status_code=400)


def _refused(exc: ValidationError, prefix: tuple[str, ...] = ()) -> JobRefusedError:
    """A ValidationError as a 400 naming each field (`records.<index>.<field>`)."""
    problems = exc.errors(include_context=False, include_input=False)
    shown = problems[:JOB_ERRORS_SHOWN]
    detail = [{"loc": [*prefix, *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in shown]
    said = "; ".join(f"{'.'.join(map(str, d['loc'])) or 'body'}: {d['msg']}" for d in detail)
    if len(problems) > len(shown):
        said += f"; and {len(problems) - len(shown):,} more"
    return JobRefusedError(said, detail)


def job_rows(
    record: type[BaseModel], body: bytes, *, max_records: int, callback_hosts: frozenset[str]
) -> tuple[list[dict[str, Any]], str | None]:
    """A POST /jobs body as (validated records, callback URL); a JobRefusedError if bad."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise JobRefusedError(f"the body is not JSON: {exc}") from None
    try:
        parsed = _JobInput.model_validate(payload)
    except ValidationError as exc:
        raise _refused(exc) from None
    callback = None
    if parsed.callback_url is not None:
        if not (parsed.callback_url.isascii() and parsed.callback_url.isprintable()):
            # urlsplit drops some control characters; PostgreSQL text takes no NUL
            raise JobRefusedError("callback_url: only printable ASCII characters are allowed")
        try:
            callback = check_url(parsed.callback_url, callback_hosts)
        except ValueError as exc:
            raise JobRefusedError(str(exc)) from None
    try:
        rows = validate_records(record, parsed.records, max_batch=max_records)
    except ValidationError as exc:
        raise _refused(exc, ("records",)) from None
    except ValueError as exc:
        raise JobRefusedError(f"records: {exc}") from None
    return rows, callback


def job_page(
    job: jobs.Job, answers: list[dict[str, Any]], offset: int, limit: int
) -> tuple[list[dict[str, Any]], int | None]:
    """The answers to hand out from `offset` and where the next page starts (None: all
    handed out). Only a run of consecutive records: an answer after a record still being
    scored waits for it, so following `next_offset` reads every answer once, in order.
    A failed job's missing records never come: its pages hold what there is."""
    if job.status == "failed":
        return answers, offset + limit if offset + limit < job.records else None
    ready = 0
    for answer in answers:
        if answer.get("request_id") != jobs.request_id(job.id, offset + ready):
            break
        ready += 1
    following = offset + ready
    return answers[:ready], None if job.ended and following >= job.records else following


TIME = "{}: an RFC 3339 date-time with a UTC offset (2026-12-01T00:00:00Z)."
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)", re.ASCII)


def _instant(name: str, value: str | None) -> datetime | None:
    """An RFC 3339 date-time, or None; a ValueError naming the parameter otherwise.

    Stricter than pydantic's datetime, which also takes numbers ("0.5" is a Unix time) and
    times without an offset, neither of which says which instant the caller means.
    """
    if value is None:
        return None
    if _RFC3339.fullmatch(value):
        try:
            return datetime.fromisoformat(value.upper())
        except ValueError:
            pass
    raise ValueError(f"{name}: {value!r} is not an RFC 3339 date-time with a UTC offset")


class _LogMetrics:
    """Copies the log's counts into /metrics: counters by their increase since last time."""

    def __init__(self, plog: PredictionLog) -> None:
        self._log = plog
        self._lock = threading.Lock()  # the event loop and the registry thread both export
        self._seen = dict.fromkeys(LOG_COUNTERS, 0)

    def export(self) -> None:
        stats: LogStats = self._log.stats()
        with self._lock:
            for name, counter in LOG_COUNTERS.items():
                now = getattr(stats, name)
                if now > self._seen[name]:
                    counter.inc(now - self._seen[name])
                    self._seen[name] = now
        QUEUE_DEPTH.set(stats.backlog_rows)
        LOG_BACKLOG_BYTES.set(stats.backlog_bytes)
        LOG_FSYNC_LAG.set(stats.fsync_lag)


def _log_refused(exc: LogRefusedError) -> JSONResponse:
    """503 with Retry-After: the rows were not written ahead, so nothing was answered."""
    response = _error(503, LOG_RETRY.format(exc.reason))
    response.headers["Retry-After"] = str(exc.retry_after)
    return response


info = FastAPI(title="predictor info")
pages = FastAPI(title="predictor readback", docs_url=None, redoc_url=None, openapi_url=None)
"""GET /predictions and the jobs; mounted at / (BentoML's passive mount matches only its
own routes). FastAPI, not @bentoml.api, for their 202 and 404 and path parameter."""


@pages.exception_handler(RequestValidationError)
async def _bad_query(request: Request, exc: RequestValidationError) -> JSONResponse:
    """400 naming the parameter, as every other error of this API (FastAPI's own is 422)."""
    problems = exc.errors()
    said = "; ".join(
        f"{'.'.join(map(str, e['loc'][1:])) or e['loc'][0]}: {e['msg']}" for e in problems
    )
    detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in problems]
    return JSONResponse({"error": said, "detail": detail}, status_code=400)


@bentoml.asgi_app(pages, path="/")
@bentoml.asgi_app(info, path="/model")
@bentoml.service(
    name="churn_predictor",
    workers=2,
    traffic={"timeout": 30},
    # Per-request access lines cost more than scoring does; errors are still logged.
    logging={"access": {"enabled": False}},
)
class Predictor:
    """POST /predict, POST /feedback, GET /predictions, GET /model, POST /jobs,
    GET /jobs/{job_id}; BentoML adds /readyz,
    /livez, /metrics. Who is calling comes from the guard: `identity.current()`."""

    bundled = bentoml.models.BentoModel(f"{BUNDLE}:latest")

    def __init__(self) -> None:
        settings = get_settings()
        if not settings.database_url:
            raise RuntimeError(
                "DATABASE_URL is not set: the predictor logs every prediction to PostgreSQL "
                "(`make serve` starts an embedded one when it is unset)"
            )
        self.settings = settings
        self.database_url = settings.database_url
        try:
            migrate(self.database_url)
        except psycopg.OperationalError as exc:  # the log's writer migrates once it connects
            log.warning("prediction log database not reachable at start-up: %s", exc)
        self.log = PredictionLog(
            self.database_url,
            settings.env_home.resolve() / "spill",
            max_spill=settings.predlog_max_backlog,
            sync_interval=settings.predlog_sync_interval,
        )
        self.log.start()
        self.log_metrics = _LogMetrics(self.log)
        # Key checks and feedback's lookups reuse connections, read-backs have their own so
        # that a long page never holds up a key check; opened here, in the worker, after the fork.
        self.lookups = pool(self.database_url)
        self.lookups.open(wait=False)
        self.pages = pool(self.database_url, max_size=2, application_name="predictor-readback")
        self.pages.open(wait=False)
        # As many connections as submissions can run at once (they run on the default
        # executor's threads, min(32, cores + 4)): a burst of big jobs then waits for
        # validation, never for a connection (a 2 s pool wait answered bursts with 503).
        self.jobs = pool(
            self.database_url,
            max_size=min(32, (os.cpu_count() or 1) + 4),
            statement_timeout=JOB_STATEMENT_TIMEOUT,
            application_name="predictor-jobs",
        )
        self.jobs.open(wait=False)
        self.callback_hosts = allowed_hosts(settings.job_callback_hosts)
        self.keys = identity.Keys(
            self.database_url, self.lookups, ttl=settings.api_key_cache_seconds
        )
        self.keys.start()
        secret = settings.mlflow_webhook_secret
        identity.install(
            identity.Gate(
                self.keys,
                secret.get_secret_value() if secret else None,
                body_limits=identity.body_limits(settings),
            )
        )
        self.runtime = ModelRuntime(settings, bundled_dir=FilePath(self.bundled.path))
        self.shadow = Shadow(self._log, on_drop=SHADOW_DROPPED.inc)
        self._flag_range = settings.predict_out_of_range == "flag"
        self._publish()
        self._observe(swapped=False)
        self.runtime.start(on_check=self._observe)

    def _observe(self, swapped: bool) -> None:
        if swapped:
            SWAPS.inc()
            self._publish()
        REGISTRY_UP.set(1 if self.runtime.registry_ok else 0)
        SERVED_VERSION.set(
            float(self.runtime.current.version) if self.runtime.current.version.isdigit() else -1
        )
        TENANT_MODELS.set(len(self.runtime.models))
        REFUSED_VERSIONS.set(len(self.runtime.refused))
        self.log_metrics.export()

    def __is_ready__(self) -> bool:
        """/readyz: not while the prediction log cannot write ahead (disk full, backlog full)."""
        self.log_metrics.export()
        return self.log.ready()

    def _log(self, *items: Item) -> None:
        """Write rows ahead to the prediction log, all or none (LogRefusedError); count the
        predictions (the shadow's too) and serving errors."""
        self.log.submit_many(items)
        for item in items:
            if isinstance(item, Prediction):
                PREDICTIONS.labels(
                    model_version=item.model_version,
                    variant=item.variant,
                    predicted_class=item.predicted,
                ).inc()
            elif isinstance(item, ServingError):
                SERVING_ERRORS.labels(model_version=item.model_version, variant=item.variant).inc()

    async def _score(self, served: ServedModel, rows: list[dict[str, Any]]) -> list[Any]:
        if len(rows) <= INLINE_ROWS:
            return served.scorer.predict(rows)
        # a big batch would hold the event loop; score it on a thread
        return await asyncio.to_thread(served.scorer.predict, rows)

    def _publish(self) -> None:
        """Give /docs.json the request contract of the model this worker now serves."""
        served = self.runtime.current
        record = self._record(served)
        PUBLISHED.set(
            Contract(
                record,
                self.settings.predict_max_batch,
                tuple(served.scorer.classes),
                job_max_records=self.settings.job_max_records,
                callback_hosts=tuple(sorted(self.callback_hosts)),
            )
        )

    def _record(self, served: ServedModel) -> type[BaseModel]:
        """The request model: bounded by the data contract unless out-of-range is flagged."""
        return served.unbounded_record if self._flag_range else served.record

    async def _model(self, tenant: str) -> ServedModel | JSONResponse:
        """The model answering `tenant`; its own is loaded on a thread on first use (503 if
        the registry cannot give it now)."""
        served = self.runtime.ready(tenant)
        if served is not None:
            return served
        try:
            served = await asyncio.to_thread(self.runtime.load, tenant)
        except ModelUnavailableError as exc:
            log.warning("%s", exc)
            return _error(503, f"{exc}; retry later")
        TENANT_MODELS.set(len(self.runtime.models))
        return served

    @bentoml.api(route="/predict", input_spec=PredictBody, output_spec=Predictions)
    async def predict(
        self, records: list[dict[str, Any]] | dict[str, Any], ctx: bentoml.Context
    ) -> Predictions | JSONResponse:
        """Score one record or a list; each answer carries its request id, model version and
        variant.

        Logged and answered as the tenant of the caller's key (scope `predict`). Send
        `X-Entity-Key` (e.g. a customer id) to keep that entity on one variant while a
        challenger takes a share of the traffic; without it the first request id decides.

        Async on purpose: a one-record ONNX score takes ~0.1 ms, less than the thread-pool
        hop a sync API costs (1-record throughput went from ~490 to ~1,250 records/s).
        """
        start = time.perf_counter()
        tenant = identity.current().tenant_id
        served = await self._model(tenant)  # one snapshot: the whole request uses one version
        if isinstance(served, JSONResponse):
            return _answered(ctx, served)
        try:
            rows = validate_records(
                self._record(served), records, max_batch=self.settings.predict_max_batch
            )
        except ValidationError:
            raise  # BentoML answers 400 with each error's field and message
        except ValueError as exc:
            return _answered(ctx, _error(400, str(exc)))
        flagged = out_of_range(served.scorer.schema, rows) if self._flag_range else None
        ids = [str(uuid.uuid4()) for _ in rows]
        choice = self.runtime.choose(
            tenant, ctx.request.headers.get(ENTITY_HEADER) or ids[0], served
        )
        answering, variant = choice.model, choice.variant
        try:
            scored = await self._score(answering, rows)
        except Exception as exc:
            if variant == "champion":
                raise
            # the challenger failed: the champion answers, the failure is logged
            log.warning("challenger %s v%s failed: %s", answering.name, answering.version, exc)
            failed = ServingError.of(
                exc,
                tenant_id=tenant,
                model_name=answering.name,
                model_version=answering.version,
                variant=variant,
                ts=datetime.now(UTC),
            )
            try:
                self._log(failed)
            except LogRefusedError as refused:
                return _answered(ctx, self._refuse(refused))
            answering, variant = choice.champion, "champion"
            scored = await self._score(answering, rows)
        elapsed = time.perf_counter() - start
        said, logged = answer_records(
            answering,
            rows,
            scored,
            ids,
            tenant=tenant,
            now=datetime.now(UTC),
            per_row_ms=elapsed * 1000 / len(rows),
            flagged=flagged,
            variant=variant,
        )
        try:  # written ahead before the answer: an answered prediction is never lost
            self._log(*logged)
        except LogRefusedError as refused:
            return _answered(ctx, self._refuse(refused))
        LATENCY.labels(model_version=answering.version, variant=variant).observe(elapsed)
        self.log_metrics.export()
        if choice.shadow is not None:  # after the answer is made; never waits
            self.shadow.offer(tenant, choice.shadow, rows)
        return {
            "tenant_id": tenant,
            "model_name": answering.name,
            "model_version": answering.version,
            "variant": cast(AnsweringVariant, variant),
            "predictions": cast(list[Answer], said),
        }

    @bentoml.api(route="/feedback", input_spec=FeedbackBody, output_spec=FeedbackAccepted)
    async def feedback(self, request_id: uuid.UUID, label: str) -> FeedbackAccepted | JSONResponse:
        """The true label for an earlier prediction of the caller's tenant (scope `feedback`).

        Labels may arrive days later. Another tenant's request id is answered exactly as an
        unknown one is; each label records the key it came with.
        """
        who = identity.current()
        served = await self._model(who.tenant_id)
        if isinstance(served, JSONResponse):
            return served
        classes = served.scorer.classes
        if label not in classes:
            return _error(
                400, f"label {label!r} is not a class of this model; expected one of {classes}"
            )
        if not await self._known(str(request_id), who.tenant_id):
            return _error(404, f"no prediction with request_id {request_id}")
        try:  # written ahead before the 200, as predictions are
            self.log.submit(
                Feedback(
                    str(request_id),
                    label,
                    datetime.now(UTC),
                    who.tenant_id,
                    source=f"key:{who.key_id}",
                )
            )
        except LogRefusedError as refused:
            return self._refuse(refused)
        self.log_metrics.export()
        return {
            "tenant_id": who.tenant_id,
            "request_id": str(request_id),
            "label": label,
            "accepted": True,
        }

    def _refuse(self, exc: LogRefusedError) -> JSONResponse:
        log.warning("request refused: %s", exc.reason)
        self.log_metrics.export()
        return _log_refused(exc)

    async def _known(self, request_id: str, tenant: str) -> bool:
        """Whether `tenant` logged the prediction (waits out log batching; yes if the DB is
        down). Async, so waiting holds no thread: a flood of unknown ids costs sleeps."""
        for attempt in range(FEEDBACK_LOOKUPS):
            if attempt:
                await asyncio.sleep(0.25)
            found = await asyncio.to_thread(prediction_exists, self.lookups, request_id, tenant)
            if found is None or found:
                return True
        return False

    @bentoml.api(route="/webhooks/mlflow", input_spec=MlflowEvent)
    def mlflow_webhook(
        self, entity: str = "", action: str = "", data: dict[str, Any] | None = None
    ) -> WebhookAnswer:
        """MLflow registry webhook (alias events): check the alias now, not at the next poll."""
        self.runtime.wake()
        return {"status": "checking", "entity": entity, "action": action}

    @info.get("/")
    def model(self) -> dict[str, Any]:
        """The caller tenant's model and version, its variants (challenger and its weight,
        shadow), its lineage tags, whether the registry answers, and the model cache's counts."""
        return {
            **self.runtime.describe(identity.current().tenant_id),
            "shadow_queue": {"depth": self.shadow.depth, "dropped": self.shadow.dropped},
            "log_queue_depth": self.log.depth,
            "log_db_up": self.log.db_up,
            "api_key_listener_up": self.keys.listening,
        }

    @pages.get("/predictions", response_model=PredictionsPage)
    def predictions(
        self,
        request: Request,
        *,
        start: Annotated[
            str | None,
            Query(description=TIME.format("From"), json_schema_extra={"format": "date-time"}),
        ] = None,
        end: Annotated[
            str | None,
            Query(description=TIME.format("Before"), json_schema_extra={"format": "date-time"}),
        ] = None,
        model_version: Annotated[str | None, Query(description="Only this model version.")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Rows per page.")] = 100,
        cursor: Annotated[
            str | None, Query(description="The previous page's `next_cursor`.")
        ] = None,
    ) -> PredictionsPage | JSONResponse:
        """The caller's own predictions, oldest first, each with its label if one came.

        Scope `predict` or `feedback`. Pages follow time: pass `next_cursor` back as
        `cursor` for the next page (null on the last). Row-level security limits the read
        to the key's tenant whatever the filters say.
        """
        tenant = identity.current().tenant_id
        unknown = sorted(set(request.query_params) - READBACK_PARAMETERS)
        if unknown:  # a misspelt filter must not quietly return everything
            known = ", ".join(sorted(READBACK_PARAMETERS))
            return _error(400, f"{unknown[0]}: not a parameter of GET /predictions ({known})")
        try:
            since, until = _instant("start", start), _instant("end", end)
        except ValueError as exc:
            return _error(400, str(exc))
        if model_version is not None and "\x00" in model_version:  # PostgreSQL text has no NUL
            return PredictionsPage(tenant_id=tenant, rows=[], next_cursor=None)
        try:
            page = read_page(
                self.pages,
                tenant,
                start=since,
                end=until,
                model_version=model_version,
                cursor=cursor,
                limit=limit,
            )
        except ValueError as exc:  # a cursor this API did not hand out
            return _error(400, f"cursor: {exc}")
        except (psycopg.OperationalError, PoolTimeout):
            return _error(503, "the prediction log cannot be read now; retry later")
        rows = [LoggedPrediction.model_validate(row) for row in page.rows]
        return PredictionsPage(tenant_id=tenant, rows=rows, next_cursor=page.next_cursor)

    @pages.post(
        "/jobs",
        status_code=202,
        response_model=JobAccepted,
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {}}}},
    )
    async def submit_job(
        self,
        request: Request,
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                pattern=IDEMPOTENCY_KEY,
                max_length=200,
                description="Sent again with a retried submission, returns the same job "
                "(1-200 printable characters; per tenant).",
            ),
        ] = None,
    ) -> JSONResponse:
        """Record records to score later and queue them: 202 with the job's status URL.

        Scope `predict`. The records are validated as /predict's are (a bad one: 400
        naming its index and field, nothing queued), up to JOB_MAX_RECORDS of them; the
        job row and its queue messages are written in one transaction.
        """
        who = identity.current()
        served = await self._model(who.tenant_id)
        if isinstance(served, JSONResponse):
            return served
        body = await request.body()  # the guard read it already, within JOB_MAX_BODY_BYTES
        try:  # 100,000 records take seconds to validate and write: not on the event loop
            job, created = await asyncio.to_thread(
                self._submit, self._record(served), who, body, idempotency_key
            )
        except JobRefusedError as refused:
            return refused.response()
        except (psycopg.OperationalError, PoolTimeout) as exc:
            log.warning("job not accepted, the job store is unreachable: %s", exc)
            return _error(503, "the job store cannot be reached now: nothing was queued; retry")
        if created:
            JOBS_ACCEPTED.inc()
        url = f"/jobs/{job.id}"
        accepted = {"job_id": job.id, "status": job.status, "status_url": url}
        return JSONResponse(
            {**accepted, "records": job.records}, status_code=202, headers={"location": url}
        )

    def _submit(
        self, record: type[BaseModel], who: Identity, body: bytes, key: str | None
    ) -> tuple[jobs.Job, bool]:
        rows, callback = job_rows(
            record,
            body,
            max_records=self.settings.job_max_records,
            callback_hosts=self.callback_hosts,
        )
        with self.jobs.connection() as conn:
            return jobs.submit(
                conn,
                who.tenant_id,
                rows,
                chunk_records=self.settings.job_chunk_records,
                idempotency_key=key,
                callback_url=callback,
                key_id=who.key_id,
            )

    @pages.get("/jobs/{job_id}", response_model=JobStatus)
    def job_status(
        self,
        request: Request,
        job_id: Annotated[
            str,
            Path(description="POST /jobs' `job_id`.", json_schema_extra={"format": "uuid"}),
        ],
        *,
        offset: Annotated[
            int, Query(ge=0, le=2**31 - 1, description="The first record to answer for.")
        ] = 0,
        limit: Annotated[
            int, Query(ge=1, le=JOB_PAGE_MAX, description="Answers per page.")
        ] = JOB_PAGE_MAX,
    ) -> JSONResponse:
        """A job of the caller's tenant: status, progress, and a page of its answers.

        Scope `predict`. Follow `next_offset` (as `offset`) until it is null to read every
        answer in submission order. Another tenant's job is answered as an unknown one.
        """
        tenant = identity.current().tenant_id
        unknown = sorted(set(request.query_params) - JOB_PARAMETERS)
        if unknown:
            known = ", ".join(sorted(JOB_PARAMETERS))
            return _error(400, f"{unknown[0]}: not a parameter of GET /jobs/{{job_id}} ({known})")
        try:
            with self.jobs.connection() as conn:
                job = jobs.get(conn, tenant, job_id)
                answers = (
                    jobs.results(conn, tenant, job.id, offset=offset, limit=limit) if job else []
                )
        except (psycopg.OperationalError, PoolTimeout):
            return _error(503, "the job store cannot be read now; retry later")
        if job is None:
            # The id is not echoed: an unknown, a malformed and a foreign id read the same.
            return _error(404, "no job with this id for the caller's tenant")
        results, following = job_page(job, answers, offset, limit)
        status = {
            "job_id": job.id,
            "tenant_id": job.tenant_id,
            "status": job.status,
            "records": job.records,
            "progress": round(job.progress, 4),
            "error": job.error,
            "created_at": job.created_at,
            "started_at": job.started_at,
            "finished_at": job.finished_at,
            "results": results,
            "next_offset": following,
        }
        return JSONResponse(jsonable_encoder(status))

    @bentoml.on_shutdown
    def close(self) -> None:
        self.runtime.stop()
        self.keys.close()
        self.shadow.close()
        self.log.close()
        self.lookups.close()
        self.pages.close()
        self.jobs.close()


# @bentoml.service returns a Service; mypy sees the class.
Predictor.add_asgi_middleware(RequestGuard, max_body=MAX_BODY_BYTES)  # type: ignore[attr-defined]
