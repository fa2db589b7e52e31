"""Pipeline timings on the example data: full and no-op `dvc repro`, training, validation rows/s.

Targets on 2 cores: full pipeline under 60 s, no-op under 3 s. Run: `make bench`.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from common.params import load_params
from models.generate import generate
from models.validate import check
from tests.workspace import ROOT, make_workspace

VALIDATION_ROWS = 1_000_000


def _timed(ws_run: object) -> float:
    start = time.perf_counter()
    assert callable(ws_run)
    ws_run()
    return time.perf_counter() - start


def validation_rows_per_second(rounds: int = 3) -> float:
    params = load_params(ROOT / "params.yaml")
    df = generate(VALIDATION_ROWS, seed=1)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        report = check(df, params.data, params.validate_)
        times.append(time.perf_counter() - start)
        assert report.passed, report.message()
    return VALIDATION_ROWS / statistics.median(times)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ws = make_workspace(Path(tmp) / "ws", fast=False)
        full = _timed(lambda: ws.run("dvc", "repro"))
        noop = [_timed(lambda: ws.run("dvc", "repro")) for _ in range(3)]
        fit = json.loads((ws.path / "reports/train.json").read_text())["fit_seconds"]
        rows = ws.params()["generate"]["rows"]
    rate = validation_rows_per_second()
    print(f"pipeline benchmark ({rows:,} example rows, 2-core target in brackets)")
    print(f"  full dvc repro from scratch   {full:7.1f} s   (< 60 s)")
    print(f"  no-op dvc repro (median of 3) {statistics.median(noop):7.1f} s   (< 3 s)")
    print(f"  training (fit only)           {fit:7.1f} s")
    print(f"  validation                    {rate:12,.0f} rows/s on {VALIDATION_ROWS:,} rows")


if __name__ == "__main__":
    main()
