"""Batch scoring throughput and peak memory: models.batch.score_batch against the raw model.

The floor is the raw model scoring the whole file at once in process (read everything,
then one predict call), through onnxruntime and through the sklearn pipeline. The batch
core reads, checks, scores and writes Parquet chunk by chunk (ONNX), optionally also
COPYing every row into the prediction log (--database-url). Each case runs in its own
subprocess so its peak RSS (getrusage) is its own; 250k and 1M rows show whether memory
grows with the batch. Prints, does not assert; compare with perf-anchors.md (batch scoring).
Run: `uv run python -m benchmarks.batch_score [--model-dir DIR] [--database-url URL]`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from common.errors import run_cli
from common.params import load_params
from common.registry.served import resolve
from common.settings import get_settings
from common.store import BatchLogWriter, sources
from models import batch
from models.data import model_frame
from models.generate import generate
from models.predict import Scorer

SIZES = (250_000, 1_000_000)
ROW_GROUP = 100_000


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _child(case: str, model_dir: Path, source: Path, out: Path, db: str | None) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    params = load_params()
    scorer = Scorer.load(model_dir, prefer_onnx=case != "floor-sklearn")
    base = _peak_mib()
    rows = pq.ParquetFile(source).metadata.num_rows
    if case.startswith("floor"):
        start = time.perf_counter()
        frame = model_frame(pq.read_table(source).to_pandas(), params.data)
        read = time.perf_counter() - start
        t0 = time.perf_counter()
        proba = scorer.proba_columns({c: frame[c].to_numpy() for c in frame.columns})
        predict = time.perf_counter() - t0
        assert proba.shape == (rows, len(scorer.classes))
        return {
            "rows": rows,
            "predict_s": predict,
            "total_s": read + predict,
            "base_mib": base,
            "peak_mib": _peak_mib(),
        }
    start = time.perf_counter()
    inp = sources.open_input(str(source))
    names = batch.columns_to_read(inp.source, inp.columns, scorer.features, ["customer_id"])
    chunks = sources.read_chunks(inp, names, params.batch_score.chunk_rows)
    kwargs: dict[str, Any] = {
        "source": inp.source,
        "columns": inp.columns,
        "model_name": "bench",
        "model_version": "1",
        "batch_id": f"bench-{rows}",
        "output_dir": out,
        "keep": ["customer_id"],
    }
    if db is not None:
        with BatchLogWriter(db) as sink:
            result = batch.score_batch(chunks, scorer, sink=sink, **kwargs)
    else:
        result = batch.score_batch(chunks, scorer, **kwargs)
    total = time.perf_counter() - start
    assert result.scored == rows
    return {"rows": rows, "total_s": total, "base_mib": base, "peak_mib": _peak_mib()}


def _measure(case: str, model_dir: Path, source: Path, out: Path, db: str | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.batch_score", "--child", case]
    cmd += ["--model-dir", str(model_dir), "--source", str(source), "--out", str(out)]
    if db:
        cmd += ["--database-url", db]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _write(rows: int, path: Path) -> None:
    """`rows` generated customers in 100k-row row groups, generated a slice at a time."""
    writer: pq.ParquetWriter | None = None
    for i, start in enumerate(range(0, rows, ROW_GROUP)):
        part = pa.Table.from_pandas(
            generate(min(ROW_GROUP, rows - start), seed=100 + i), preserve_index=False
        )
        writer = writer or pq.ParquetWriter(path, part.schema)
        writer.write_table(part, row_group_size=ROW_GROUP)
    if writer is not None:
        writer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, help="an MLflow model dir (default: the champion)")
    ap.add_argument("--database-url", help="also log every row (PostgreSQL)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(
            json.dumps(_child(args.child, args.model_dir, args.source, args.out, args.database_url))
        )
        return
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        root = Path(tmp)
        model_dir = args.model_dir
        if model_dir is None:
            settings = get_settings()
            ref = resolve(settings, settings.model_name, settings.model_alias, root / "models")
            model_dir = ref.path
            print(f"model: {ref.name} v{ref.version} from the registry")
        chunk = load_params().batch_score.chunk_rows
        print(
            f"batch_score chunk_rows={chunk:,}; onnxruntime 1 thread; input Parquet, "
            f"{ROW_GROUP:,}-row row groups\n"
        )
        print(
            f"  {'case':<34} {'rows':>9} {'rows/s':>10} {'predict-only rows/s':>20} "
            f"{'peak RSS':>9} {'(+ over loaded model)':>22}"
        )
        cases = ["floor-onnx", "floor-sklearn", "batch-core"]
        if args.database_url:
            cases.append("batch-core+log")
        floor = 0.0
        for rows in SIZES:
            source = root / f"in-{rows}.parquet"
            _write(rows, source)
            for case in cases:
                db = args.database_url if case == "batch-core+log" else None
                r = _measure(case, model_dir, source, root / f"out-{case}", db)
                rate = r["rows"] / r["total_s"]
                predict = r["rows"] / r["predict_s"] if "predict_s" in r else None
                if case == "floor-onnx" and predict:
                    floor = predict
                label = {
                    "floor-onnx": "floor: onnx, whole file at once",
                    "floor-sklearn": "floor: sklearn, whole file at once",
                    "batch-core": "batch_score core (chunked, onnx)",
                    "batch-core+log": "batch_score core + prediction log",
                }[case]
                print(
                    f"  {label:<34} {rows:>9,} {rate:>10,.0f} "
                    f"{f'{predict:,.0f}' if predict else '-':>20} "
                    f"{r['peak_mib']:>7,.0f} MiB {r['peak_mib'] - r['base_mib']:>18,.0f} MiB"
                )
                if case.startswith("batch") and floor:
                    print(f"  {'':<34} {'':>9} {rate / floor:>9.0%} of the onnx predict floor")
            print()


if __name__ == "__main__":
    run_cli(main)
