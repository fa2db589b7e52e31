"""ONNX export of the whole sklearn pipeline, and the parity check that guards it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import pandas as pd
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType, StringTensorType
from sklearn.pipeline import Pipeline

from common.params import DataParams

OPSET = {"": 17, "ai.onnx.ml": 3}


def export(pipeline: Pipeline, data: DataParams) -> bytes:
    """Convert the fitted pipeline: one input per feature, probabilities as a plain tensor."""
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
    return bytes(model.SerializeToString())


def feed(frame: pd.DataFrame, data: DataParams) -> dict[str, np.ndarray]:
    """ONNX inputs from a model frame (see models.data.model_frame)."""
    out: dict[str, np.ndarray] = {}
    for name, spec in data.features.items():
        col = frame[name].to_numpy()
        out[name] = (
            col.astype(np.float32) if spec.type == "numeric" else col.astype(object)
        ).reshape(-1, 1)
    return out


def session(onnx_bytes: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])


def predict_proba(sess: ort.InferenceSession, frame: pd.DataFrame, data: DataParams) -> np.ndarray:
    _, proba = sess.run(None, feed(frame, data))
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
