"""The closed loop of `make demo`, on the embedded default, after `dvc repro` made a champion.

1. serve the champion (BentoML, prediction log in an embedded PostgreSQL);
2. send traffic like the training data, run `monitor` on it: no drift;
3. send drifted traffic (the generator's covariate shift and concept drift), its true
   labels arriving afterwards through /feedback; run `monitor`: drift, alert, event;
4. run `retrain` (what the event triggers in the full stack): the labelled production
   rows join the training data, `train` registers a challenger, the gate decides;
5. keep a client sending requests throughout, and watch the service swap to the new
   champion with no failed request;
6. print a summary table and the commands that open the UIs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

from common import registry
from common.errors import run_cli
from common.localpg import EMBEDDED_DB, EMBEDDED_PG_PORT, LocalPostgres
from common.params import load_params
from common.settings import get_settings
from common.store import connect
from flows.monitor import Outcome, monitor
from flows.retrain import retrain
from models.generate import Drift, generate
from services.predictor.demo import demo_key, show_answers
from services.predictor.launch import serving

console = Console(highlight=False)

DRIFT = Drift(
    covariate={"tenure_months": -0.8, "monthly_charges": 0.8, "contract_type": 0.3},
    concept=1.0,
)


HEADERS = {"content-type": "application/json"}
"""Every request's headers; run_loop adds the default tenant's key it makes."""


def _request(url: str, body: dict[str, Any] | None = None, timeout: float = 30) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=HEADERS)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _records(df: pd.DataFrame, features: list[str]) -> list[dict[str, Any]]:
    return [
        {str(k): (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        for row in df[features].astype(object).to_dict(orient="records")
    ]


def send(url: str, df: pd.DataFrame, features: list[str], batch: int = 100) -> list[str]:
    """POST the rows to /predict in batches; the request ids, in row order."""
    ids: list[str] = []
    records = _records(df, features)
    for i in range(0, len(records), batch):
        answer = _request(f"{url}/predict", {"records": records[i : i + batch]})
        ids += [p["request_id"] for p in answer["predictions"]]
    return ids


def wait_logged(database_url: str, since: datetime, expected: int, timeout: float = 60) -> None:
    """Predictions are logged off the request path: wait until the window holds them all."""
    deadline = time.monotonic() + timeout
    while True:
        with connect(database_url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM predictions WHERE ts >= %s", [since]
            ).fetchone()
        n = int(row[0]) if row else 0
        if n >= expected or time.monotonic() > deadline:
            return
        time.sleep(0.5)


@dataclass
class Watcher:
    """A client sending one record at a time, noting who answered and any failure."""

    url: str
    record: dict[str, Any]
    answers: list[tuple[float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                answer = _request(f"{self.url}/predict", {"records": [self.record]}, timeout=10)
                self.answers.append((time.monotonic(), str(answer["model_version"])))
            except (urllib.error.URLError, OSError, KeyError, ValueError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def versions(self) -> set[str]:
        return {v for _, v in self.answers}

    def wait_for(self, version: str, timeout: float) -> float | None:
        """Seconds until `version` answered, or None if it did not within `timeout`."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if any(v == version for _, v in self.answers):
                return time.monotonic() - start
            time.sleep(0.2)
        return None


@dataclass
class LoopResult:
    first_version: str
    calm: Outcome
    drifted: Outcome
    promoted: bool
    new_version: str
    swap_seconds: float | None
    requests: int
    failed: int
    old_after_swap: int
    monitoring_runs: int


def _monitor_since(start: datetime) -> Outcome:
    end = datetime.now(UTC)
    return monitor(window_hours=(end - start).total_seconds() / 3600 + 1e-6, end=end)


def run_loop(port: int, calm_rows: int, drift_rows: int, label_share: float) -> LoopResult:
    params = load_params()
    features = params.data.feature_names
    os.environ.setdefault("MODEL_POLL_SECONDS", "2")
    settings = get_settings()
    url = f"http://127.0.0.1:{port}"
    with serving(settings, port):
        os.environ["DATABASE_URL"] = database_url = _database_url()
        get_settings.cache_clear()
        key = demo_key(database_url).secret
        HEADERS["authorization"] = f"Bearer {key}"
        first = str(_request(f"{url}/model/")["model_version"])
        console.rule(f"1. serving {settings.model_name} v{first}")
        show_answers(url, key)

        calm = generate(calm_rows, seed=101)
        start = datetime.now(UTC)
        send(url, calm, features)
        wait_logged(database_url, start, len(calm))
        console.rule(f"2. {len(calm):,} requests like the training data -> monitor")
        calm_outcome = _monitor_since(start)
        console.print(calm_outcome.run.summary)

        drifted = generate(drift_rows, seed=202, drift=DRIFT)
        start = datetime.now(UTC)
        ids = send(url, drifted, features)
        wait_logged(database_url, start, len(drifted))
        labelled = drifted.sample(frac=label_share, random_state=0).index
        for i in labelled:  # labels arrive late, after the predictions
            _request(
                f"{url}/feedback",
                {"request_id": ids[i], "label": str(drifted.loc[i, params.data.target])},
            )
        time.sleep(1.5)  # the feedback rows are logged off the request path too
        console.rule(
            f"3. {len(drifted):,} drifted requests, {len(labelled):,} labels later -> monitor"
        )
        drift_outcome = _monitor_since(start)
        console.print(drift_outcome.run.summary)

        watcher = Watcher(url, _records(calm.head(1), features)[0])
        watcher.start()
        retrain_start = time.monotonic()
        promoted = False
        if drift_outcome.run.drift_detected:
            console.rule("4. drift -> retrain (labelled production rows join the data) -> gate")
            promoted = retrain(project_dir=".", monitor_run_id=drift_outcome.run.mlflow_run_id)
        new = first
        swap: float | None = None
        if promoted:
            new = str(_current_champion())
            console.rule(f"5. v{new} is champion: waiting for the service to swap")
            if watcher.wait_for(new, timeout=60) is not None:
                swap = next(t for t, v in watcher.answers if v == new) - retrain_start
            time.sleep(2)
        watcher.stop()
        swapped_at = next((t for t, v in watcher.answers if v == new), None)
        old_after = (
            sum(1 for t, v in watcher.answers if swapped_at and t > swapped_at + 5 and v != new)
            if promoted
            else 0
        )
        with connect(database_url) as conn:
            row = conn.execute("SELECT count(*) FROM monitoring_runs").fetchone()
        return LoopResult(
            first_version=first,
            calm=calm_outcome,
            drifted=drift_outcome,
            promoted=promoted,
            new_version=new,
            swap_seconds=swap,
            requests=len(watcher.answers) + len(watcher.failures),
            failed=len(watcher.failures),
            old_after_swap=old_after,
            monitoring_runs=int(row[0]) if row else 0,
        )


def _database_url() -> str:
    settings = get_settings()
    if settings.database_url:
        return settings.database_url
    return LocalPostgres(settings.mlops_home / "postgres", port=EMBEDDED_PG_PORT).url(EMBEDDED_DB)


def _current_champion() -> str:
    settings = get_settings()
    mv = registry.version_by_alias(
        registry.connect(settings), settings.model_name, settings.model_alias
    )
    return str(mv.version) if mv else "?"


def print_summary(r: LoopResult) -> None:
    table = Table(title="The closed loop")
    for col in ("step", "result", "where"):
        table.add_column(col)
    evid = get_settings().evidently_target
    table.add_row("serve", f"v{r.first_version} answering", "POST /predict, /feedback")
    for label, o in (("monitor (calm traffic)", r.calm), ("monitor (drifted)", r.drifted)):
        run = o.run
        verdict = "DRIFT" if run.drift_detected else ("no drift" if run.enough_rows else "too few")
        table.add_row(
            label,
            f"{verdict}: {o.share_drifted:.0%} of features drifted, "
            f"{run.current_rows:,} rows ({run.labelled_rows:,} labelled)",
            f"MLflow run {run.mlflow_run_id}\n{run.report_uri}/report.html\n"
            f"Evidently project {run.evidently_project}",
        )
    table.add_row(
        "retrain + gate",
        f"v{r.new_version} promoted" if r.promoted else "no new champion",
        "MLflow registry: gate.* and alias.* tags on the version",
    )
    table.add_row(
        "live swap",
        f"v{r.new_version} answering {r.swap_seconds:.0f} s after retraining began; "
        f"{r.failed} of {r.requests:,} requests failed, "
        f"{r.old_after_swap} old-version answers after the swap"
        if r.swap_seconds is not None
        else f"{r.failed} of {r.requests:,} requests failed",
        "GET /model",
    )
    console.print(table)
    console.print(f"Evidently workspace: {evid}")
    console.print(
        "Open the UIs: make mlflow-ui (http://127.0.0.1:5000) | make evidently-ui "
        "(http://127.0.0.1:8000) | make prefect-server (http://127.0.0.1:4200: the flow runs "
        "above, from Prefect's local database)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--calm-rows", type=int, default=3000)
    parser.add_argument("--drift-rows", type=int, default=8000)
    parser.add_argument("--label-share", type=float, default=0.8)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    result = run_loop(args.port, args.calm_rows, args.drift_rows, args.label_share)
    print_summary(result)
    if args.json:
        args.json.write_text(json.dumps(result, default=_as_json, indent=1))


def _as_json(o: Any) -> Any:
    """A monitor Outcome as its flat payload, any other dataclass as its fields."""
    return o.payload() if isinstance(o, Outcome) else o.__dict__


if __name__ == "__main__":
    run_cli(main)
