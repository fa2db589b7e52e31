"""Drift of one window, side by side: Evidently's DataDriftPreset vs `models.drift`'s fast path.

Each path runs in a fresh subprocess; peak memory is that process's VmHWM, imports and the
loaded Parquet included (ru_maxrss would carry the parent's peak across fork and exec).
Windows of 100k and 1M rows against a 50k-row reference, 15 columns (14 features and the
label). Target on 2 cores: 1M rows in < 60 s and < 2 GiB.
Run: `uv run python -m benchmarks.monitoring` (`--rounds 1` for a quick look).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from common.params import load_params
from models.drift import drift
from models.generate import Drift, generate, write_table
from tests.oracle_evidently import evidently_drift
from tests.workspace import ROOT

REFERENCE_ROWS = 50_000
SIZES = (100_000, 1_000_000)
SAMPLE_ROWS = 100_000
SHIFT = Drift(
    covariate={"age": 0.3, "avg_daily_usage_min": 0.12, "region": 0.3, "payment_method": 0.5},
    churn_rate=0.3,
)
PATHS = {
    "evidently": "Evidently DataDriftPreset, all rows",
    "fast": "fast path, all rows",
    "fast_sampled": f"fast path, {SAMPLE_ROWS // 1000}k-row sample",
}


def _peak_mib() -> float:
    """This process's peak resident memory (VmHWM), reset by exec unlike ru_maxrss."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(path: str, reference: Path, current: Path, rounds: int) -> dict[str, Any]:
    """One path in this (fresh) process: median time of `rounds` runs, peak RSS, the verdicts."""
    params = load_params(ROOT / "params.yaml")
    monitor = params.monitor
    if path == "fast_sampled":
        monitor = monitor.model_copy(update={"sample_rows": SAMPLE_ROWS})
    ref, cur = pd.read_parquet(reference), pd.read_parquet(current)
    loaded = _peak_mib()
    decide = evidently_drift if path == "evidently" else drift
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        result = decide(ref, cur, params.data, monitor)
        times.append(time.perf_counter() - start)
    columns = (*result.features, *result.prediction)
    return {
        "seconds": statistics.median(times),
        "peak_mib": _peak_mib(),
        "loaded_mib": loaded,
        "scores": {c.column: c.score for c in columns},
        "drifted": {c.column: c.drifted for c in columns},
    }


def _spawn(path: str, reference: Path, current: Path, rounds: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.monitoring", "--child", path]
    cmd += ["--reference", str(reference), "--current", str(current), "--rounds", str(rounds)]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=list(PATHS))
    parser.add_argument("--reference", type=Path)
    parser.add_argument("--current", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.reference, args.current, args.rounds)))
        return
    params = load_params(ROOT / "params.yaml")
    columns = [*params.data.feature_names, params.data.target]
    with tempfile.TemporaryDirectory() as tmp:
        reference = Path(tmp) / "reference.parquet"
        write_table(generate(REFERENCE_ROWS, seed=1)[columns], reference)
        print(f"drift benchmark: {len(columns)} columns, {REFERENCE_ROWS:,}-row reference")
        print(f"  (median of {args.rounds}; peak RSS of a fresh process, data loaded included)")
        for size in SIZES:
            current = Path(tmp) / f"current_{size}.parquet"
            write_table(generate(size, seed=2, drift=SHIFT)[columns], current)  # not kept here
            runs = {p: _spawn(p, reference, current, args.rounds) for p in PATHS}
            base = runs["evidently"]
            print(f"\n{size:,} current rows")
            for path, run in runs.items():
                same = sum(run["drifted"][c] == base["drifted"][c] for c in base["drifted"])
                worst = max(abs(run["scores"][c] - base["scores"][c]) for c in base["scores"])
                n_drifted = sum(run["drifted"].values())
                print(
                    f"  {PATHS[path]:38s} {run['seconds']:6.2f} s  peak {run['peak_mib']:6.0f} MiB"
                    f" (data {run['loaded_mib']:4.0f})  drifted {n_drifted:2d}"
                    f"  verdicts {same}/{len(base['drifted'])} same, max |score diff| {worst:.1e}"
                )
            margins = sorted((abs(s - 0.1), c) for c, s in base["scores"].items())[:3]
            print(
                "  closest to the 0.1 threshold: " + ", ".join(f"{c} {m:.3f}" for m, c in margins)
            )


if __name__ == "__main__":
    main()
