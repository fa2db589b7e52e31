"""The predictor's OpenAPI document as the service really behaves, served at /docs.json.

BentoML generates the document from the API signatures, but (1.4, see bentoml/BentoML#2975:
no hook to extend it) it documents every error as `{"error": str, "detail": str}` with
400/404/500 only, while it answers a validation error with a list in `detail` and the
guard answers 413/415. The record schema also depends on the model being served, which
can change while the service runs. `document` rewrites what BentoML generated with what
is sent; `Contract` is the served model's part of it, kept current by the service.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, TypeAdapter, create_model

from models.predict import records_type

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
API_ROUTES = {
    "/predict": (400, 413, 415),
    "/feedback": (400, 404, 413, 415),
    "/webhooks/mlflow": (400, 413, 415),
}


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


@dataclass(frozen=True)
class Contract:
    """What the served model makes of a request: its record, batch limit and classes."""

    record: type[BaseModel]
    max_batch: int
    classes: tuple[str, ...]

    def predict_body(self) -> dict[str, Any]:
        model = create_model(
            "PredictRequest", records=(records_type(self.record, max_batch=self.max_batch), ...)
        )
        return _schema(model)

    def feedback_body(self) -> dict[str, Any]:
        label: Any = Literal[self.classes] if self.classes else str
        model = create_model("FeedbackRequest", request_id=(Any, ...), label=(label, ...))
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


def document(spec: dict[str, Any], contract: Contract | None = None) -> dict[str, Any]:
    """BentoML's generated document with the real request bodies and error responses."""
    out = copy.deepcopy(spec)
    out.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    paths: dict[str, Any] = out.get("paths", {})
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
    if contract is not None:
        _set_body(paths, "/predict", contract.predict_body())
        _set_body(paths, "/feedback", contract.feedback_body())
    return out


def _set_body(paths: dict[str, Any], path: str, schema: dict[str, Any]) -> None:
    post = paths.get(path, {}).get("post")
    if post is not None:
        post["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}},
    }


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
