"""ONNX export of the whole sklearn pipeline, and the parity check that guards it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType, StringTensorType
from sklearn.pipeline import Pipeline

from common.params import DataParams
from models.predict import ONNX_INPUTS_KEY, onnx_inputs

OPSET = {"": 17, "ai.onnx.ml": 3}
_NOT_IN_NAME = re.compile(r"[^0-9A-Za-z_]")


def input_names(columns: Iterable[str]) -> dict[str, str]:
    """Each column's ONNX input name: a C identifier made from it, unique, stable in order.

    A name that already is one stays as it is (as older models' inputs were named);
    otherwise every other character becomes `_` and a leading digit gets a `_` before it:
    "bill length (mm)" -> "bill_length__mm_", "3d_score" -> "_3d_score". A name an
    earlier column took gets a number after it ("a.b", "a b" -> "a_b", "a_b1").
    """
    out: dict[str, str] = {}
    for column in columns:
        base = _NOT_IN_NAME.sub("_", column) or "_"
        if base[0].isdigit():
            base = f"_{base}"
        name, n = base, 1
        while name in out.values():
            name, n = f"{base}{n}", n + 1
        out[column] = name
    return out


def _rename_inputs(model: onnx.ModelProto, names: list[str]) -> None:
    """Give the graph's inputs (in declaration order) these names, wherever they are read."""
    graph = model.graph
    rename = {
        value.name: new for value, new in zip(graph.input, names, strict=True) if value.name != new
    }
    if not rename:
        return
    made = {out for node in graph.node for out in node.output}
    made |= {init.name for init in graph.initializer}
    clash = sorted(made & set(rename.values()))
    if clash:  # skl2onnx named an inner value so; renaming would wire the graph wrong
        raise ValueError(f"ONNX input names {clash} are taken inside the converted graph")
    for value in graph.input:
        value.name = rename.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [rename.get(name, name) for name in node.input]


def export(pipeline: Pipeline, data: DataParams) -> bytes:
    """Convert the fitted pipeline: one input per feature, probabilities as a plain tensor.

    Inputs are named by `input_names` (ONNX names are identifiers, columns need not be);
    the column -> input mapping goes into the model's metadata (ONNX_INPUTS_KEY), where
    `feed` and `models.predict.Scorer` read it.
    """
    names = input_names(data.feature_names)
    inputs = [
        (
            name,
            FloatTensorType([None, 1]) if spec.type == "numeric" else StringTensorType([None, 1]),
        )
        for name, spec in data.features.items()
    ]
    clf = pipeline.steps[-1][1]
    model = to_onnx(
        pipeline,
        initial_types=inputs,
        options={id(clf): {"zipmap": False}},
        target_opset=OPSET,
    )
    _rename_inputs(model, list(names.values()))
    entry = model.metadata_props.add()
    entry.key, entry.value = ONNX_INPUTS_KEY, json.dumps(names)
    return bytes(model.SerializeToString())


def feed(
    frame: pd.DataFrame, data: DataParams, names: Mapping[str, str] | None = None
) -> dict[str, np.ndarray]:
    """ONNX inputs from a model frame (see models.data.model_frame), keyed by `names`
    (column -> input; default: the columns' own names)."""
    out: dict[str, np.ndarray] = {}
    for name, spec in data.features.items():
        col = frame[name].to_numpy()
        out[(names or {}).get(name, name)] = (
            col.astype(np.float32) if spec.type == "numeric" else col.astype(object)
        ).reshape(-1, 1)
    return out


def session(onnx_bytes: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])


def predict_proba(sess: ort.InferenceSession, frame: pd.DataFrame, data: DataParams) -> np.ndarray:
    _, proba = sess.run(None, feed(frame, data, onnx_inputs(sess, data.feature_names)))
    return np.asarray(proba, dtype=np.float64)


@dataclass(frozen=True)
class Parity:
    """How far ONNX's probabilities are from sklearn's on the same rows."""

    rows: int
    max_abs_diff: float
    label_mismatches: int
    atol: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol and self.label_mismatches == 0


def check_parity(
    pipeline: Pipeline, onnx_bytes: bytes, frame: pd.DataFrame, data: DataParams, atol: float
) -> Parity:
    native = pipeline.predict_proba(frame)
    onnx = predict_proba(session(onnx_bytes), frame, data)
    return Parity(
        rows=len(frame),
        max_abs_diff=float(np.abs(native - onnx).max()) if len(frame) else 0.0,
        label_mismatches=int((native.argmax(axis=1) != onnx.argmax(axis=1)).sum()),
        atol=atol,
    )
