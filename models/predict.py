"""predict: score request records with a logged model, and validate requests against it.

The serving layer stays thin: it loads a `Scorer` from a downloaded MLflow model directory,
builds the request model with `record_model`, and calls `validate_records` then `predict`.
Missing values are normalised exactly as `models.data.model_frame` does at training time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import onnxruntime as ort
import pandas as pd
import skops.io  # type: ignore[import-untyped]
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model
from sklearn.pipeline import Pipeline

from models.data import MISSING_CATEGORY
from models.manifest import UntrustedModelError

Kind = Literal["numeric", "categorical"]
Backend = Literal["onnx", "sklearn"]
Record = Mapping[str, Any]
Bounds = tuple[float | None, float | None]

ONNX_ARTIFACT = Path("extra_files", "model.onnx")
"""Where train.py's log_model(extra_files=...) puts the ONNX export inside the model dir."""
ONNX_INPUTS_KEY = "mlops.onnx_inputs"
"""ONNX metadata entry: JSON {column: input name}, written by models.export.export."""
CONTRACT_ARTIFACT = Path("extra_files", "data_contract.json")
"""The features' declared min/max as trained (train.CONTRACT_FILE); older versions lack it."""
SKOPS_TRUSTED = ["numpy.dtype", "sklearn.tree._tree.Tree"]
"""The types skops loads beyond its own safe defaults: defined here, never read from a
version's MLmodel (whose `skops_trusted_types` whoever wrote the version chose)."""
SKOPS_FORMAT = "skops"

_KINDS: dict[str, Kind] = {
    "double": "numeric",
    "float": "numeric",
    "long": "numeric",
    "integer": "numeric",
    "string": "categorical",
}
_NAN = float("nan")
_ONNX_TYPES: dict[Kind, str] = {"numeric": "tensor(float)", "categorical": "tensor(string)"}


class ModelError(Exception):
    """The model directory cannot be served as is: the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Scored:
    """One record's prediction: the most probable class and every class's probability."""

    label: str
    probabilities: dict[str, float]


@dataclass(frozen=True)
class Schema:
    """What a request record holds: features in order, known categories, example values.

    `bounds` holds (min, max) of the numeric features the model's data contract declares.
    """

    features: tuple[tuple[str, Kind], ...]
    categories: Mapping[str, tuple[str, ...]]
    examples: Mapping[str, float | str] = field(default_factory=dict)
    bounds: Mapping[str, Bounds] = field(default_factory=dict)


class Scorer:
    """A logged model ready to score records, through onnxruntime or the sklearn pipeline."""

    def __init__(
        self,
        pipeline: Pipeline,
        schema: Schema,
        session: ort.InferenceSession | None = None,
        example: list[dict[str, Any]] | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._schema = schema
        self._names = [name for name, _ in schema.features]
        self._classes = [str(c) for c in pipeline.classes_]
        self._session = session
        self._inputs = onnx_inputs(session, self._names) if session else {}
        self._proba_output = _proba_output(session, schema, len(self._classes)) if session else ""
        self._example = example

    @classmethod
    def load(cls, model_dir: Path, *, prefer_onnx: bool, what: str | None = None) -> Scorer:
        """Load from a local MLflow model directory (as download_artifacts returns it);
        `what` names it in a refusal (e.g. `models:/<name>/<version>`)."""
        if not (model_dir / "MLmodel").is_file():
            raise ModelError(f"{model_dir}: no MLmodel file; not an MLflow model directory")
        meta = Model.load(str(model_dir))
        features = _signature_features(meta, model_dir)
        pipeline = load_pipeline(model_dir, meta, what=what)
        _check_inputs(pipeline, features, model_dir)
        categories = _known_categories(pipeline, features, model_dir)
        try:
            frame = meta.load_input_example(str(model_dir))
        except (MlflowException, OSError, ValueError):
            frame = None  # self_check says so; scoring does not need it
        example = _example_records(frame, features) if isinstance(frame, pd.DataFrame) else None
        bounds = _contract_bounds(model_dir, features)
        schema = Schema(
            features=tuple(features),
            categories=categories,
            examples=_example_values(example, features, categories, bounds),
            bounds=bounds,
        )
        onnx_path = model_dir / ONNX_ARTIFACT
        session = _session(onnx_path) if prefer_onnx and onnx_path.is_file() else None
        return cls(pipeline, schema, session, example)

    @property
    def features(self) -> list[tuple[str, Kind]]:
        return list(self._schema.features)

    @property
    def categories(self) -> dict[str, list[str]]:
        return {name: list(values) for name, values in self._schema.categories.items()}

    @property
    def classes(self) -> list[str]:
        return list(self._classes)

    @property
    def backend(self) -> Backend:
        return "onnx" if self._session is not None else "sklearn"

    @property
    def schema(self) -> Schema:
        return self._schema

    def proba(self, records: Sequence[Record]) -> np.ndarray:
        """Class probabilities, one row per record, columns in `classes` order (float64)."""
        if not records:
            return np.empty((0, len(self._classes)))
        if self._session is not None:
            feed = self._columns(records, np.float32, self._inputs)
            out = self._session.run([self._proba_output], feed)[0]
            return np.asarray(out, dtype=np.float64)
        frame = pd.DataFrame(
            {name: col[:, 0] for name, col in self._columns(records, np.float64).items()},
            columns=self._names,
        )
        return np.asarray(self._pipeline.predict_proba(frame), dtype=np.float64)

    def proba_columns(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """Class probabilities from whole columns, for batch scoring without per-row dicts.

        Numeric columns are floats with NaN for missing; categorical columns hold strings
        with missing values already as MISSING_CATEGORY (what `models.data.model_frame` makes).
        """
        rows = len(next(iter(columns.values()))) if columns else 0
        if rows == 0:
            return np.empty((0, len(self._classes)))
        if self._session is not None:
            feed = {
                self._inputs[name]: np.asarray(
                    columns[name], np.float32 if kind == "numeric" else object
                ).reshape(-1, 1)
                for name, kind in self._schema.features
            }
            out = self._session.run([self._proba_output], feed)[0]
            return np.asarray(out, dtype=np.float64)
        frame = pd.DataFrame({name: columns[name] for name in self._names}, columns=self._names)
        return np.asarray(self._pipeline.predict_proba(frame), dtype=np.float64)

    def predict(self, records: Sequence[Record]) -> list[Scored]:
        """Label and probabilities per record, in the order given."""
        classes = self._classes
        out = []
        for row in self.proba(records).tolist():  # plain floats: cheaper than numpy per row
            label = classes[row.index(max(row))]
            out.append(Scored(label, dict(zip(classes, row, strict=True))))
        return out

    def self_check(self, *, atol: float = 1e-5) -> None:
        """Score the model's own input example; raise ModelError if the output is malformed.

        With ONNX, the example is also scored by the sklearn pipeline: an ONNX file that
        does not belong to this pipeline fails here rather than in production.
        """
        if not self._example:
            raise ModelError("the model has no input example (input_example.json) to check with")
        rows, width = len(self._example), len(self._classes)
        proba = self.proba(self._example)
        if proba.shape != (rows, width):
            raise ModelError(
                f"scored {rows} example rows into shape {proba.shape}, not {rows, width}"
            )
        if not np.isfinite(proba).all():
            raise ModelError("probabilities on the input example contain NaN or infinity")
        if (proba < -1e-6).any() or (proba > 1 + 1e-6).any():
            raise ModelError("probabilities on the input example fall outside [0, 1]")
        worst = float(np.abs(proba.sum(axis=1) - 1.0).max())
        if worst > 1e-4:
            raise ModelError(f"probabilities on the input example sum to 1 +- {worst:.1e}")
        scored = self.predict(self._example)
        if len(scored) != rows or any(s.label not in self._classes for s in scored):
            raise ModelError("predict returned the wrong number of results or an unknown label")
        if self._session is not None:
            native = Scorer(self._pipeline, self._schema).proba(self._example)
            diff = float(np.abs(native - proba).max())
            if diff > atol:
                raise ModelError(
                    f"ONNX and sklearn disagree on the input example: max |dp| = {diff:.1e} "
                    f"(allowed {atol:.0e}); is extra_files/model.onnx from this model?"
                )

    def _columns(
        self,
        records: Sequence[Record],
        dtype: type[np.floating],
        keys: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """One (n, 1) array per feature, missing values as model_frame makes them.

        Keyed by `keys` (feature -> ONNX input name) when given, else by feature name.
        """
        out: dict[str, np.ndarray] = {}
        for name, kind in self._schema.features:
            key = keys[name] if keys else name
            try:
                if kind == "numeric":
                    out[key] = np.array(
                        [[_NAN if (v := r[name]) is None else v] for r in records], dtype
                    )
                else:
                    out[key] = np.array([[_category(r[name])] for r in records], dtype=object)
            except KeyError:
                raise ValueError(f"a record has no value for feature {name!r}") from None
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{name}: {exc}") from exc
        return out


def load_pipeline(model_dir: Path, meta: Model | None = None, what: str | None = None) -> Pipeline:
    """The fitted sklearn pipeline, read from the version's skops file with the types trusted
    in code (SKOPS_TRUSTED), never through MLflow's loader, which obeys the MLmodel.

    A version whose MLmodel says cloudpickle or pickle is refused (UntrustedModelError).
    """
    meta = meta or Model.load(str(model_dir))
    what = what or str(model_dir)
    flavor = meta.flavors.get("sklearn")
    if not isinstance(flavor, dict):
        raise ModelError(f"{model_dir}: the MLmodel has no sklearn flavor")
    fmt = flavor.get("serialization_format")
    if fmt != SKOPS_FORMAT:
        raise UntrustedModelError(
            f"{what}: the MLmodel asks to load the pipeline with {fmt!r}; only "
            f"{SKOPS_FORMAT!r} is loaded here (pickle formats run code from the file)"
        )
    name = str(flavor.get("pickled_model", ""))
    path = (model_dir / name).resolve()
    if not name or not path.is_relative_to(model_dir.resolve()) or not path.is_file():
        raise ModelError(f"{model_dir}: the MLmodel's pickled_model {name!r} is not a file in it")
    try:
        pipeline = skops.io.load(path, trusted=SKOPS_TRUSTED)
    except Exception as exc:  # skops refuses untrusted types with UntrustedTypesFoundException
        raise UntrustedModelError(
            f"{what}: {name} does not load with the project's trusted types "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(pipeline, Pipeline):
        raise ModelError(f"{model_dir}: expected an sklearn Pipeline, got {type(pipeline)}")
    return pipeline


def _category(value: Any) -> str:
    """model_frame's rule: None, NaN and "" are MISSING_CATEGORY; anything else its str()."""
    if isinstance(value, str):
        return value or MISSING_CATEGORY
    if (
        value is None
        or value is pd.NA
        or (isinstance(value, float | np.floating) and math.isnan(value))
    ):
        return MISSING_CATEGORY
    return str(value)


def _signature_features(meta: Model, model_dir: Path) -> list[tuple[str, Kind]]:
    signature = meta.signature
    if signature is None or not signature.inputs.has_input_names():
        raise ModelError(f"{model_dir}: the model has no column-based input signature")
    features: list[tuple[str, Kind]] = []
    for col in signature.inputs.inputs:
        type_name = getattr(col.type, "name", str(col.type))
        if type_name not in _KINDS:
            raise ModelError(f"{model_dir}: feature {col.name!r} has unsupported type {type_name}")
        features.append((str(col.name), _KINDS[type_name]))
    return features


def _check_inputs(pipeline: Pipeline, features: list[tuple[str, Kind]], model_dir: Path) -> None:
    fitted = getattr(pipeline, "feature_names_in_", None)
    names = [name for name, _ in features]
    if fitted is not None and [str(n) for n in fitted] != names:
        raise ModelError(
            f"{model_dir}: the signature's features {names} differ from the pipeline's "
            f"{[str(n) for n in fitted]}"
        )


def _known_categories(
    pipeline: Pipeline, features: list[tuple[str, Kind]], model_dir: Path
) -> dict[str, tuple[str, ...]]:
    """Categories the fitted OneHotEncoder knows, without the missing-value marker."""
    wanted = [name for name, kind in features if kind == "categorical"]
    if not wanted:
        return {}
    try:
        pre = pipeline.named_steps["preprocess"]
        encoder = pre.named_transformers_["cat"]
        columns = next(cols for name, _, cols in pre.transformers_ if name == "cat")
        learned = dict(zip(columns, encoder.categories_, strict=True))
    except (KeyError, AttributeError, StopIteration) as exc:
        raise ModelError(
            f"{model_dir}: expected a 'preprocess' ColumnTransformer with a fitted 'cat' "
            f"OneHotEncoder ({type(exc).__name__}: {exc})"
        ) from exc
    missing = [name for name in wanted if name not in learned]
    if missing:
        raise ModelError(f"{model_dir}: the encoder has no categories for {missing}")
    return {
        name: tuple(str(c) for c in learned[name] if isinstance(c, str) and c != MISSING_CATEGORY)
        for name in wanted
    }


def _example_records(frame: pd.DataFrame, features: list[tuple[str, Kind]]) -> list[dict[str, Any]]:
    """The input example as request records would carry it: missing values as None."""
    records: list[dict[str, Any]] = []
    for row in frame.to_dict(orient="records"):
        record: dict[str, Any] = {}
        for name, kind in features:
            value = row.get(name)
            if kind == "numeric":
                record[name] = None if value is None or pd.isna(value) else float(value)
            else:
                category = _category(value)
                record[name] = None if category == MISSING_CATEGORY else category
        records.append(record)
    return records


def _contract_bounds(model_dir: Path, features: list[tuple[str, Kind]]) -> dict[str, Bounds]:
    """(min, max) per numeric feature from the model's data contract; none without one."""
    path = model_dir / CONTRACT_ARTIFACT
    if not path.is_file():
        return {}
    try:
        declared = json.loads(path.read_text())["features"]
        out: dict[str, Bounds] = {}
        for name, kind in features:
            spec = declared.get(name) or {}
            low, high = spec.get("min"), spec.get("max")
            if kind == "numeric" and (low is not None or high is not None):
                out[name] = (
                    None if low is None else float(low),
                    None if high is None else float(high),
                )
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ModelError(f"{path}: not a data contract ({type(exc).__name__}: {exc})") from exc
    return out


def _example_values(
    example: list[dict[str, Any]] | None,
    features: list[tuple[str, Kind]],
    categories: Mapping[str, tuple[str, ...]],
    bounds: Mapping[str, Bounds],
) -> dict[str, float | str]:
    """A plausible value per feature for the JSON schema: from the input example if it has one."""
    out: dict[str, float | str] = {}
    for name, kind in features:
        seen = [r[name] for r in example or [] if r.get(name) is not None]
        if kind == "numeric":
            low, high = bounds.get(name, (None, None))
            inside = [
                float(v) for v in seen if (low is None or v >= low) and (high is None or v <= high)
            ]
            out[name] = inside[0] if inside else low if low is not None else high or 0.0
        else:
            known = categories.get(name, ())
            usable = [v for v in seen if v in known]
            if usable or known:
                out[name] = usable[0] if usable else known[0]
    return out


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    # One thread per session: serving workers share the cores (see the OMP note in perf-anchors).
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_inputs(session: ort.InferenceSession, columns: Sequence[str]) -> dict[str, str]:
    """Each column's ONNX input name: as the export recorded it, else the column's own name.

    Models exported before the mapping existed named their inputs after the columns.
    """
    recorded = session.get_modelmeta().custom_metadata_map.get(ONNX_INPUTS_KEY)
    names: dict[str, str] = json.loads(recorded) if recorded else {}
    return {column: names.get(column, column) for column in columns}


def _proba_output(session: ort.InferenceSession, schema: Schema, classes: int) -> str:
    """Check the ONNX inputs against the signature; return the probabilities output's name."""
    got = {i.name: i.type for i in session.get_inputs()}
    inputs = onnx_inputs(session, [name for name, _ in schema.features])
    want = {inputs[name]: _ONNX_TYPES[kind] for name, kind in schema.features}
    if got != want:
        raise ModelError(f"the ONNX model's inputs {got} do not match the signature's {want}")
    for out in session.get_outputs():
        shape = out.shape
        if out.type == "tensor(float)" and len(shape) == 2 and shape[1] in (classes, None):
            return str(out.name)
    raise ModelError(f"the ONNX model has no (n, {classes}) float probabilities output")


def record_model(
    source: Scorer | Schema, *, name: str = "Record", bounded: bool = True
) -> type[BaseModel]:
    """A pydantic model of one request record: every feature required, null for missing.

    Numbers must be finite JSON numbers (no strings, no booleans) and, when `bounded`,
    inside the range the model's data contract declares; a category must be one the
    model was trained on; unknown fields are rejected. Any column name works as a field
    (`field_names`); dump with `by_alias=True` to get the records keyed by feature.
    """
    schema = source.schema if isinstance(source, Scorer) else source
    names = field_names([feature for feature, _ in schema.features])
    fields: dict[str, Any] = {}
    for feature, kind in schema.features:
        alias = feature if names[feature] != feature else None
        example = schema.examples.get(feature)
        examples = [example] if example is not None else None
        if kind == "numeric":
            low, high = schema.bounds.get(feature, (None, None))
            annotation: Any = Annotated[
                float | None,
                Field(
                    alias=alias,
                    strict=True,
                    allow_inf_nan=False,
                    ge=low if bounded else None,
                    le=high if bounded else None,
                    examples=examples,
                    description=f"A number{_range_text(low, high)}; null when missing.",
                ),
            ]
        else:
            known = schema.categories.get(feature, ())
            allowed: Any = Literal[known] | None if known else None
            annotation = Annotated[
                allowed,
                Field(
                    alias=alias,
                    examples=examples,
                    description=f"One of {list(known)}; null when missing.",
                ),
            ]
        fields[names[feature]] = (annotation, ...)
    config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={"examples": [dict(schema.examples)]} if schema.examples else None,
    )
    model: type[BaseModel] = create_model(name, __config__=config, **fields)
    return model


def field_names(features: Sequence[str]) -> dict[str, str]:
    """Each feature's attribute name in the request model: its own, unless pydantic cannot
    take it (a leading `_`, the `model_` namespace, a BaseModel attribute such as `schema`
    or `copy`); then `field_<i>`, and the feature's name is the field's alias, so requests,
    errors, dumps and the JSON schema still use the feature's name."""
    out: dict[str, str] = {}
    for i, feature in enumerate(features):
        if not feature.startswith(("_", "model_")) and not hasattr(BaseModel, feature):
            out[feature] = feature
            continue
        name = f"field_{i}"
        while name in features:  # a column may itself be called field_<i>
            name += "_"
        out[feature] = name
    return out


def _range_text(low: float | None, high: float | None) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f" >= {low:g}"
    if low is None:
        return f" <= {high:g}"
    return f" in [{low:g}, {high:g}]"


def records_type(record: type[BaseModel], *, max_batch: int) -> Any:
    """What a request's `records` may be: one record, or a list of 1..max_batch of them."""
    batch = Annotated[list[record], Field(min_length=1, max_length=max_batch)]  # type: ignore[valid-type]
    return batch | record


def out_of_range(schema: Schema, rows: Sequence[Record]) -> list[list[str]]:
    """Per row, one message for each value outside its feature's declared range."""
    out: list[list[str]] = []
    for row in rows:
        found = []
        for name, (low, high) in schema.bounds.items():
            value = row.get(name)
            if value is None:
                continue
            if low is not None and value < low:
                found.append(f"{name}: {value:g} is below the trained minimum {low:g}")
            elif high is not None and value > high:
                found.append(f"{name}: {value:g} is above the trained maximum {high:g}")
        out.append(found)
    return out


@lru_cache(maxsize=16)
def _batch_adapter(model: type[BaseModel]) -> TypeAdapter[list[BaseModel]]:
    return TypeAdapter(list[model])  # type: ignore[valid-type]


def validate_records(
    model: type[BaseModel], payload: Any, *, max_batch: int
) -> list[dict[str, Any]]:
    """Validate one record (a JSON object) or a batch (a list of them); return plain dicts.

    Raises pydantic.ValidationError for bad records: its errors' loc is (field,) for a
    single record and (index, field) in a batch. Raises ValueError for an empty or
    oversized batch, or a payload that is neither an object nor a list.
    """
    if isinstance(payload, Mapping):
        return [model.model_validate(payload).model_dump(by_alias=True)]
    if not isinstance(payload, list):
        raise ValueError(
            f"expected a record (JSON object) or a list of records, got {type(payload).__name__}"
        )
    if not payload:
        raise ValueError("the batch is empty: send at least one record")
    if len(payload) > max_batch:
        raise ValueError(
            f"the batch has {len(payload):,} records; at most {max_batch:,} are allowed per request"
        )
    return [
        item.model_dump(by_alias=True) for item in _batch_adapter(model).validate_python(payload)
    ]
