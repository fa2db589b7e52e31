"""The predictor's OpenAPI document as the service really behaves, served at /docs.json.

BentoML generates the document from the API signatures, but (1.4, see bentoml/BentoML#2975:
no hook to extend it) it documents every error as `{"error": str, "detail": str}` with
400/404/500 only, while it answers a validation error with a list in `detail` and the
guard answers 401/403/413/415. It knows nothing of the API keys either. The record schema
also depends on the model being served, which can change while the service runs.
`document` rewrites what BentoML generated with what is sent, and declares the key (HTTP
bearer, or the X-API-Key header) on every operation that needs one, so Swagger UI and
generated clients send it; `Contract` is the served model's part, kept current by the
service.
"""

from __future__ import annotations

import copy
import re
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter, create_model

from common.registry.variants import ENTITY_HEADER
from models.predict import records_type
from services.predictor.identity import REALM, SCOPES_BY_PATH, required_scopes, route

REF = "#/components/schemas/{model}"
ALLOWED = {
    "/healthz": ("GET", "HEAD"),
    "/livez": ("GET", "HEAD"),
    "/readyz": ("GET", "HEAD"),
    "/metrics": ("GET", "HEAD"),
    "/docs.json": ("GET", "HEAD"),
    "/schema.json": ("GET", "HEAD"),
    "/": ("GET", "HEAD"),
}
"""BentoML's own routes and the methods they serve; anything else gets a 405 from the guard."""

ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "What was wrong, naming the field."},
        "detail": {
            "description": "Pydantic's errors (loc, msg, type), one a problem; or a text.",
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "object"}},
            ],
        },
    },
}
"""Every 4xx body: the guard's and the API's `{"error": ...}`, BentoML's with `detail`."""

ERRORS = {
    400: "Bad input: the body is not JSON, or a field is missing, unknown, of the wrong type "
    "or out of range; `error` and `detail` name the field.",
    404: "No prediction with this request_id.",
    405: "Method not allowed on this route (see the `Allow` header).",
    413: "Request body over the size limit.",
    415: "Content-Type is not application/json.",
}
AUTH_ERRORS = {
    401: "No API key, or not a valid one (unknown, malformed, expired or revoked). The "
    '`WWW-Authenticate` header says which (RFC 6750: `error="invalid_token"` when a key '
    "was sent).",
    403: "The key is valid but lacks the scope this operation needs (`WWW-Authenticate`: "
    '`error="insufficient_scope"`).',
    503: "PostgreSQL cannot be reached to check the key (or to read or write the data), or "
    "the caller's model cannot be loaded, now; retry later.",
}
SIGNATURE_401 = (
    "Missing or bad MLflow signature (X-MLflow-Signature, X-MLflow-Timestamp within 5 "
    "minutes, X-MLflow-Delivery-Id)."
)
API_ROUTES = {
    "/predict": (400, 413, 415),
    "/jobs": (400, 413, 415),
    "/feedback": (400, 404, 413, 415),
    "/webhooks/mlflow": (400, 413, 415),
}
SECURITY_SCHEMES: dict[str, Any] = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key of your tenant: `Authorization: Bearer <key>` "
        "(`mlops tenants keys create <tenant>`).",
    },
    "apiKey": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "The same key in the X-API-Key header.",
    },
    "mlflowSignature": {
        "type": "apiKey",
        "in": "header",
        "name": "X-MLflow-Signature",
        "description": "MLflow's HMAC-SHA256 webhook signature (`v1,<base64>` of "
        "`<delivery id>.<timestamp>.<body>`), with X-MLflow-Timestamp and "
        "X-MLflow-Delivery-Id; required instead of a key when MLFLOW_WEBHOOK_SECRET is set.",
    },
}
ENTITY_PARAMETER: dict[str, Any] = {
    "in": "header",
    "name": ENTITY_HEADER,
    "required": False,
    "description": "Who the records are about (e.g. a customer id): while a challenger takes "
    "a share of the traffic, one entity key of a tenant is always answered by the same "
    "variant (the answer's `variant`). Without it the request's first request id decides.",
    "schema": {"type": "string"},
}
"""/predict's optional header: the key of sticky variant assignment."""
CURSOR_FORMAT = "cursor"
"""The `format` of GET /predictions' `cursor`: only a `next_cursor` this API returned."""
KEY_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]
"""Either scheme: OpenAPI cannot say 'this scope of the key', the description does."""


STRICT = ConfigDict(extra="forbid")
"""Request bodies take only their own fields: no body names a tenant (the key does)."""


class PredictBody(BaseModel):
    """POST /predict: one record or a list of them."""

    model_config = STRICT

    records: list[dict[str, Any]] | dict[str, Any]


class FeedbackBody(BaseModel):
    """POST /feedback: the true label of an earlier prediction of the caller's tenant."""

    model_config = STRICT

    request_id: uuid.UUID
    label: str


class LoggedPrediction(BaseModel):
    """One of the caller's logged predictions, with its label if one came."""

    request_id: str
    ts: datetime
    model_name: str
    model_version: str
    variant: Literal["champion", "challenger", "shadow"]
    """Which of the registered model's variants made it; a shadow's never reached a client."""
    inputs: dict[str, Any]
    predicted: str
    probabilities: dict[str, float | None]
    batch_id: str | None = None
    label: str | None = None
    labelled_at: datetime | None = None
    label_source: str | None = None


class PredictionsPage(BaseModel):
    """GET /predictions: a page of the caller's tenant's predictions, oldest first."""

    tenant_id: str
    rows: list[LoggedPrediction]
    next_cursor: str | None


JOB_PAGE_MAX = 1000
"""The most answers one GET /jobs/{job_id} returns."""
IDEMPOTENCY_KEY = r"^[!-~]([ -~]{0,198}[!-~])?$"
"""An Idempotency-Key: 1-200 printable ASCII characters, no space at either end."""


class JobBody(BaseModel):
    """POST /jobs: records (as /predict takes them, more of them) and where to call back."""

    model_config = STRICT

    records: list[dict[str, Any]] | dict[str, Any]
    callback_url: str | None = None


class JobAccepted(BaseModel):
    """A job recorded and queued: poll `status_url` (also the `Location` header)."""

    job_id: str
    status: Literal["queued", "running", "done", "failed"]
    status_url: str
    records: int


class JobAnswer(BaseModel):
    """One record's answer, as /predict gives it, with the version that scored it."""

    model_config = ConfigDict(extra="allow")

    request_id: str
    predicted_class: str
    probabilities: dict[str, float]
    model_name: str
    model_version: str
    variant: Literal["champion"] = "champion"
    """Jobs are always scored by the champion."""


class JobStatus(BaseModel):
    """GET /jobs/{job_id}: the job and a page of its answers, in submission order.

    `results` holds the answers of records `offset` onwards that are ready, up to `limit`
    of them; ask again from `next_offset` (the first record not returned) until it is null
    (the job ended and every answer was handed out). An empty page of a running job means
    wait. A failed job's page holds whatever was scored (each answer's request_id says
    which record it is); `error` says why it failed.
    """

    job_id: str
    tenant_id: str
    status: Literal["queued", "running", "done", "failed"]
    records: int
    progress: float
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    results: list[JobAnswer]
    next_offset: int | None


class MlflowEvent(BaseModel):
    """The body of an MLflow registry webhook; only its arrival matters."""

    entity: str = ""
    action: str = ""
    data: dict[str, Any] | None = None


FEEDBACK_FROM_PREDICTION = {
    "request_id": "$response.body#/predictions/0/request_id",
    "label": "$response.body#/predictions/0/predicted_class",
}
"""An OpenAPI link's body: /feedback for the first prediction of a /predict answer."""
JOB_FROM_SUBMISSION = {"job_id": "$response.body#/job_id"}
"""An OpenAPI link's parameters: the status of the job POST /jobs accepted."""


@dataclass(frozen=True)
class Contract:
    """What the served model makes of a request: its record, batch limit and classes."""

    record: type[BaseModel]
    max_batch: int
    classes: tuple[str, ...]
    job_max_records: int = 1
    callback_hosts: tuple[str, ...] = ()

    def predict_body(self) -> dict[str, Any]:
        model = create_model(
            "PredictRequest",
            __config__=STRICT,
            records=(records_type(self.record, max_batch=self.max_batch), ...),
        )
        return _schema(model)

    def job_body(self) -> dict[str, Any]:
        """POST /jobs' body; `callback_url` only to the allowed hosts (none: null only)."""
        model = create_model(
            "JobRequest",
            __config__=STRICT,
            records=(records_type(self.record, max_batch=self.job_max_records), ...),
        )
        schema = _schema(model)
        url: dict[str, Any] = {"type": "null"}  # JSON null: no callback
        if self.callback_hosts:
            hosts = "|".join(re.escape(h) for h in self.callback_hosts)
            allowed = rf"^https?://({hosts})(:[0-9]{{1,5}})?([/?#][!-~]*)?$"
            url = {"anyOf": [{"type": "string", "maxLength": 2048, "pattern": allowed}, url]}
        url["description"] = (
            "Where a signed POST goes when the job ends: only to the hosts JOB_CALLBACK_HOSTS "
            "allows (none: callbacks are off)."
        )
        schema["properties"]["callback_url"] = url
        return schema

    def feedback_body(self) -> dict[str, Any]:
        label: Any = Literal[self.classes] if self.classes else str
        model = create_model(
            "FeedbackRequest", __config__=STRICT, request_id=(Any, ...), label=(label, ...)
        )
        schema = _schema(model)
        schema["properties"]["request_id"] = {"type": "string", "format": "uuid"}
        return schema


class Published:
    """The contract of the model this worker serves now; the service sets it on each swap."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._contract: Contract | None = None

    def set(self, contract: Contract) -> None:
        with self._lock:
            self._contract = contract

    def get(self) -> Contract | None:
        with self._lock:
            return self._contract


PUBLISHED = Published()


def document(
    spec: dict[str, Any], contract: Contract | None = None, *, signed_webhook: bool = False
) -> dict[str, Any]:
    """BentoML's generated document with the real request bodies, security and errors.

    `signed_webhook`: MLFLOW_WEBHOOK_SECRET is set, so the registry webhook takes MLflow's
    signature instead of a key.
    """
    out = copy.deepcopy(spec)
    components = out.setdefault("components", {})
    components.setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    components["securitySchemes"] = SECURITY_SCHEMES
    paths: dict[str, Any] = out.get("paths", {})
    _queries(paths)
    for path, statuses in API_ROUTES.items():
        post = paths.get(path, {}).get("post")
        if post is None:
            continue
        post["responses"] = {
            code: body
            for code, body in post.get("responses", {}).items()
            if not str(code).startswith("5") and int(code) not in ERRORS
        } | {str(code): _error(ERRORS[code]) for code in statuses}
        post.setdefault("requestBody", {})["required"] = True
    for path, methods in ALLOWED.items():
        for method in methods:
            operation = paths.get(path, {}).get(method.lower())
            if operation is not None:
                operation.setdefault("responses", {})["405"] = _error(ERRORS[405])
    ready = paths.get("/readyz", {}).get("get")
    if ready is not None:
        ready["responses"]["503"] = {"description": "Not ready yet (still loading)."}
    answered = paths.get("/predict", {}).get("post", {}).get("responses", {}).get("200")
    feedback = paths.get("/feedback", {}).get("post", {}).get("operationId")
    if answered is not None and feedback:  # stateful tests chain a prediction to its feedback
        link = {"operationId": feedback, "requestBody": FEEDBACK_FROM_PREDICTION}
        answered["links"] = {"Feedback": link}
    # BentoML's flattened schema drops the `null` that `data` may be.
    _set_body(paths, "/webhooks/mlflow", _schema(MlflowEvent))
    _set_body(paths, "/predict", _schema(PredictBody))
    _set_body(paths, "/feedback", _schema(FeedbackBody))
    _set_body(paths, "/jobs", _schema(JobBody))
    if contract is not None:
        _set_body(paths, "/predict", contract.predict_body())
        _set_body(paths, "/feedback", contract.feedback_body())
        _set_body(paths, "/jobs", contract.job_body())
    predict = paths.get("/predict", {}).get("post")
    if predict is not None:
        predict.setdefault("parameters", []).append(ENTITY_PARAMETER)
    _jobs(paths)
    _secure(paths, signed_webhook)
    return out


def _secure(paths: dict[str, Any], signed_webhook: bool) -> None:
    """Every operation but health and metrics: the key it needs, and its 401/403/503."""
    for path, item in paths.items():
        needed = required_scopes(path.rstrip("/") or "/")
        if needed is None:
            continue
        for method, operation in item.items():
            if method not in ("get", "put", "post", "delete", "patch", "head", "options"):
                continue
            responses = operation.setdefault("responses", {})
            if path == "/webhooks/mlflow" and signed_webhook:
                operation["security"] = [{"mlflowSignature": []}]
                responses["401"] = _error(SIGNATURE_401, challenge=True)
                continue
            operation["security"] = KEY_SECURITY
            responses["401"] = _error(AUTH_ERRORS[401], challenge=True)
            responses["403"] = _error(AUTH_ERRORS[403], challenge=True)
            responses["503"] = _error(AUTH_ERRORS[503])
            scopes = " or ".join(f"`{s}`" for s in sorted(needed)) or "any"
            note = f"Needs an API key with scope {scopes} (realm `{REALM}`)."
            operation["description"] = f"{operation.get('description', '')}\n\n{note}".strip()


def _jobs(paths: dict[str, Any]) -> None:
    """The job operations' own statuses: 202 with Location, 404, 503 when the store is down."""
    submit = paths.get("/jobs", {}).get("post")
    accepted = None
    if submit is not None:
        accepted = submit.get("responses", {}).get("202")
        if accepted is not None:
            accepted["headers"] = {
                "Location": {
                    "description": "The job's status URL (`/jobs/{job_id}`).",
                    "required": True,
                    "schema": {"type": "string"},
                }
            }
    status = paths.get("/jobs/{job_id}", {}).get("get")
    if accepted is not None and status is not None and status.get("operationId"):
        link = {"operationId": status["operationId"], "parameters": JOB_FROM_SUBMISSION}
        accepted["links"] = {"Status": link}
    if status is not None:
        status.setdefault("responses", {})["404"] = _error(
            "No job with this id for the caller's tenant (unknown, malformed, another "
            "tenant's or removed after its retention time: all answered alike)."
        )


def _queries(paths: dict[str, Any]) -> None:
    """FastAPI's query operations as they behave: a bad parameter is a 400 naming it (not
    422), an optional parameter is absent or a value (never null), a cursor is opaque."""
    for path in (p for p in paths if route(p.rstrip("/")) in SCOPES_BY_PATH):
        for operation in paths[path].values():
            if not isinstance(operation, dict):
                continue
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None:
                responses["400"] = _error(
                    "A query parameter is not valid; `error` names it and says why."
                )
            for parameter in operation.get("parameters", []):
                schema = parameter.get("schema", {})
                branches = [b for b in schema.pop("anyOf", []) if b.get("type") != "null"]
                if len(branches) == 1:
                    schema.update(branches[0])
                elif branches:
                    schema["anyOf"] = branches
                if parameter.get("name") == "cursor":
                    schema["format"] = CURSOR_FORMAT


def _set_body(paths: dict[str, Any], path: str, schema: dict[str, Any]) -> None:
    post = paths.get(path, {}).get("post")
    if post is not None:
        post["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }


def _error(description: str, challenge: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}},
    }
    if challenge:
        response["headers"] = {
            "WWW-Authenticate": {
                "description": "The authentication scheme, realm and why it failed.",
                "required": True,
                "schema": {"type": "string"},
            }
        }
    return response


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    """An inline JSON schema (definitions resolved) for one request body."""
    schema = TypeAdapter(model).json_schema(ref_template="#/$defs/{model}")
    inlined: dict[str, Any] = _inline(schema, schema.pop("$defs", {}))
    return inlined


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.rsplit("/", 1)[1]], defs)
        return {k: _inline(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node
