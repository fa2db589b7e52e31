"""One `monitor` run's work from PostgreSQL, side by side with Evidently's report on all rows.

Set-up (not timed): a throwaway PostgreSQL with N logged predictions of a drifted window
(30% labelled through `feedback`), scored by a small model of the pipeline's kind, and a
50k-row scored reference. Then, each in a fresh process (peak memory = its VmHWM):

- `monitor run`: the flow's steps without the uploads: the window read
  (`common.store.monitoring.read_window`, one COPY), the verdicts on every row
  (`models.drift.drift`), the Evidently report on a `monitor.report_rows` sample written
  to HTML and JSON (`models.report.write`);
- `Evidently, naive`: the same window read, then Evidently's `DataDriftPreset` and
  `DataSummaryPreset` on every row (what one would write first), its verdicts compared.

Run: `uv run python -m benchmarks.monitor_run` (`--sizes 100000` for a quick look).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.monitoring import SHIFT, _peak_mib
from common.params import load_params
from common.store import connect, migrate, monitoring
from models.data import model_frame
from models.drift import _columns, _frame, drift
from models.generate import generate
from models.report import _as_objects, _drift_metrics, _run, write
from models.train import build
from tests.servers import throwaway_cluster
from tests.workspace import ROOT

REFERENCE_ROWS = 50_000
T0 = datetime(2026, 11, 1, tzinfo=UTC)
PARAMS = load_params(ROOT / "params.yaml")


def _scored(df: pd.DataFrame, model: Any) -> pd.DataFrame:
    proba = model.predict_proba(model_frame(df, PARAMS.data))[:, 1]
    out = df[[*PARAMS.data.feature_names, PARAMS.data.target]].copy()
    out["predicted"] = (proba >= 0.5).astype(int)
    out["proba_1"] = proba
    return out


def _load(url: str, window: pd.DataFrame) -> None:
    """COPY the window into `predictions` (and 30% of its labels into `feedback`)."""
    migrate(url)
    features = PARAMS.data.feature_names
    values = window[features].astype(object)
    records = values.where(window[features].notna().to_numpy(), other=None)  # type: ignore[call-overload]
    ids = [str(uuid.uuid4()) for _ in range(len(window))]
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute("SET statement_timeout = 0")  # a million rows take longer than 30 s
        with cur.copy(
            "COPY predictions (request_id, ts, model_name, model_version, inputs, predicted,"
            " probabilities, latency_ms) FROM STDIN"
        ) as copy:
            for i, (rec, pred, p1) in enumerate(
                zip(
                    records.to_dict(orient="records"),
                    window["predicted"],
                    window["proba_1"],
                    strict=True,
                )
            ):
                copy.write_row(
                    (
                        ids[i],
                        T0 + timedelta(microseconds=i),
                        "churn-classifier",
                        "1",
                        json.dumps(rec),
                        str(pred),
                        json.dumps({"0": 1 - p1, "1": p1}),
                        1.0,
                    )
                )
        labelled = np.random.default_rng(0).random(len(window)) < 0.3
        with cur.copy("COPY feedback (request_id, label, ts) FROM STDIN") as copy:
            for j in np.flatnonzero(labelled).tolist():
                copy.write_row((ids[j], str(window["churned"].iat[j]), T0 + timedelta(days=1)))
        cur.execute("ANALYZE predictions; ANALYZE feedback")


def _read(url: str, reference: pd.DataFrame) -> pd.DataFrame:
    window = monitoring.Window("churn-classifier", "1", T0, T0 + timedelta(days=1))
    current = monitoring.read_window(url, window, PARAMS.data, positive_class="1")
    for col in ("churned", "predicted"):
        current[col] = monitoring.target_like(current[col], reference["churned"])
    return current


def child(path: str, url: str, reference_file: Path) -> dict[str, Any]:
    reference = pd.read_parquet(reference_file)
    times: dict[str, float] = {}
    start = time.perf_counter()
    current = _read(url, reference)
    times["read"] = time.perf_counter() - start
    out: dict[str, Any] = {"rows": len(current), "labelled": int(current["churned"].notna().sum())}
    if path == "monitor":
        t = time.perf_counter()
        result = drift(reference, current, PARAMS.data, PARAMS.monitor)
        times["verdicts"] = time.perf_counter() - t
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            write(result, reference, current, PARAMS.data, PARAMS.monitor, out=Path(tmp))
        times["report"] = time.perf_counter() - t
        out["drifted"] = {c.column: c.drifted for c in (*result.features, *result.prediction)}
    else:
        from evidently.presets import DataSummaryPreset  # type: ignore[import-untyped]  # noqa: PLC0415

        t = time.perf_counter()
        cols = _columns(reference, current, PARAMS.data, PARAMS.monitor)
        ref, cur = _as_objects(_frame(reference, cols.all)), _as_objects(_frame(current, cols.all))
        snapshot = _run(
            [*_drift_metrics(cols, PARAMS.monitor, {n for n, _ in cols.all}), DataSummaryPreset()],
            ref,
            cur,
            cols,
        )
        times["evidently"] = time.perf_counter() - t
        drifted = {}
        for metric in snapshot.dict()["metrics"]:
            config = metric["config"]
            if config["type"].endswith(":ValueDrift"):
                drifted[config["column"]] = float(metric["value"]) >= float(config["threshold"])
        out["drifted"] = drifted
    out["times"] = times
    out["seconds"] = time.perf_counter() - start
    out["peak_mib"] = _peak_mib()
    return out


def _spawn(path: str, url: str, reference: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.monitor_run", "--child", path, "--url", url]
    cmd += ["--reference", str(reference)]
    proc = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--child", choices=["monitor", "evidently"])
    parser.add_argument("--url")
    parser.add_argument("--reference", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.url, args.reference)))
        return
    train = generate(20_000, seed=3)
    small = PARAMS.train.model_copy(update={"n_estimators": 30})
    model = build(PARAMS.data, small).fit(model_frame(train, PARAMS.data), train["churned"])
    with tempfile.TemporaryDirectory() as tmp:
        reference = Path(tmp) / "reference.parquet"
        _scored(generate(REFERENCE_ROWS, seed=1), model).to_parquet(reference)
        print(f"monitor run from PostgreSQL: {REFERENCE_ROWS:,}-row scored reference, 2 cores")
        for size in args.sizes:
            with throwaway_cluster("bench", "bench") as pg:
                url = pg.url("bench")
                start = time.perf_counter()
                _load(url, _scored(generate(size, seed=2, drift=SHIFT), model))
                print(
                    f"\n{size:,} logged predictions (loaded in {time.perf_counter() - start:.0f} s)"
                )
                runs = {p: _spawn(p, url, reference) for p in ("monitor", "evidently")}
            base = runs["evidently"]["drifted"]
            for name, run in runs.items():
                same = sum(run["drifted"].get(c) == v for c, v in base.items())
                parts = ", ".join(f"{k} {v:.1f} s" for k, v in run["times"].items())
                print(
                    f"  {name:9s} {run['seconds']:6.1f} s ({parts})"
                    f"  peak {run['peak_mib']:6.0f} MiB"
                    f"  rows {run['rows']:,} ({run['labelled']:,} labelled)"
                    f"  verdicts {same}/{len(base)} as Evidently's"
                )


if __name__ == "__main__":
    main()
