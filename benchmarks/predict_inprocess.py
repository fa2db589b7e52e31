"""In-process scoring latency of models.predict: ONNX record path vs the sklearn pipeline.

Scores the served model (MODEL_NAME@MODEL_ALIAS from the registry, as after `make demo`)
or a model directory given with --model-dir. Prints, does not assert: compare with
/work/shared/reference/perf-anchors.md (0.04 ms ONNX from records, 3.2 ms sklearn, 1 record).
Run: `uv run python -m benchmarks.predict_inprocess`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow.artifacts
import numpy as np
import pandas as pd

from common import registry
from common.errors import UserError, run_cli
from common.params import load_params
from common.settings import get_settings
from models import export
from models.data import model_frame
from models.generate import generate
from models.predict import Scorer, record_model, validate_records

CALLS = 2_000
WARMUP = 200
BATCH = 100


def _latencies_ms(call: Callable[[int], object], calls: int) -> list[float]:
    for i in range(WARMUP):
        call(i)
    out = []
    for i in range(calls):
        start = time.perf_counter_ns()
        call(i)
        out.append((time.perf_counter_ns() - start) / 1e6)
    return out


def _row(name: str, latencies: list[float]) -> None:
    p50 = statistics.median(latencies)
    p99 = float(np.percentile(latencies, 99))
    print(f"  {name:<44} p50 {p50:7.3f} ms   p99 {p99:7.3f} ms")


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as a JSON request carries them: missing values are None."""
    return [
        {str(k): None if pd.isna(v) else v for k, v in row.items()}
        for row in frame.to_dict(orient="records")
    ]


def _records_per_second(scorer: Scorer, records: list[dict[str, Any]]) -> float:
    batches = [records[i : i + BATCH] for i in range(0, len(records) - BATCH + 1, BATCH)]
    times = _latencies_ms(lambda i: scorer.predict(batches[i % len(batches)]), 100)
    return BATCH / (statistics.median(times) / 1e3)


def _download(uri: str, dst: Path) -> Path:
    registry.connect(get_settings())
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except mlflow.exceptions.MlflowException as exc:
        raise UserError(f"{uri}: {exc.message} (run `make demo` or pass --model-dir)") from exc


def run(model_dir: Path, calls: int) -> None:
    data = load_params().data
    rows = generate(calls, seed=11)
    onnx, sk = (Scorer.load(model_dir, prefer_onnx=p) for p in (True, False))
    record = record_model(onnx)
    records = validate_records(record, _records(rows[data.feature_names]), max_batch=calls)
    frames = [model_frame(rows.iloc[[i]], data) for i in range(min(calls, 500))]
    session = export.session((model_dir / "extra_files" / "model.onnx").read_bytes())

    n = len(records)
    print(f"in-process scoring, 1 record per call, {calls:,} calls ({model_dir})")
    _row(
        "onnx, input built from the record",
        _latencies_ms(lambda i: onnx.predict([records[i % n]]), calls),
    )
    _row(
        "sklearn pipeline, 1-row DataFrame",
        _latencies_ms(lambda i: sk.predict([records[i % n]]), calls),
    )
    _row(
        "onnx via 1-row model_frame (export.feed)",
        _latencies_ms(
            lambda i: export.predict_proba(session, frames[i % len(frames)], data), calls
        ),
    )
    raw = _records(rows[data.feature_names])
    _row(
        "validate_records, 1 record",
        _latencies_ms(lambda i: validate_records(record, raw[i % n], max_batch=1), calls),
    )
    for name, scorer in (("onnx", onnx), ("sklearn", sk)):
        rate = _records_per_second(scorer, records)
        print(f"  {name + f', {BATCH}-record batches':<44} {rate:12,.0f} records/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="a downloaded MLflow model directory")
    parser.add_argument("--calls", type=int, default=CALLS)
    args = parser.parse_args()
    if args.model_dir:
        run(args.model_dir, args.calls)
        return
    settings = get_settings()
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"models:/{settings.model_name}@{settings.model_alias}"
        run(_download(uri, Path(tmp)), args.calls)


if __name__ == "__main__":
    run_cli(main)
