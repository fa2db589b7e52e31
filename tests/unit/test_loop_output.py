"""What `make demo` prints is the data as written: a `[a, b]` column list is not rich markup."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from common.store import monitoring
from flows.monitor import Outcome
from scripts import loop

SUMMARY = (
    "8,000 rows against a 1,000-row reference (8,000 rows tested): 3 of 14 features drifted "
    "(21%; dataset drift at 50%: no) [tenure_months, monthly_charges, contract_type]. "
    "Prediction/label drift: predicted 0.212."
)


def _outcome(summary: str = SUMMARY, report_uri: str = "s3://mlflow/1/[run]/monitoring") -> Outcome:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    run = monitoring.RunRecord(
        run_id="r1",
        model_name="churn-classifier",
        model_version="1",
        window_start=now,
        window_end=now,
        current_rows=8000,
        labelled_rows=6400,
        enough_rows=True,
        drift_detected=True,
        summary=summary,
        mlflow_run_id="abc",
        report_uri=report_uri,
        evidently_project="p1",
    )
    return Outcome(run, share_drifted=0.21, alerted=True)


@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """A console wide enough that no line wraps inside what a test looks for."""
    monkeypatch.setattr(loop.console, "width", 400)


@pytest.mark.usefixtures("wide")
def test_the_verdict_keeps_its_list_of_drifted_columns() -> None:
    with loop.console.capture() as out:
        loop.show_verdict(_outcome())

    assert "(21%; dataset drift at 50%: no) [tenure_months, monthly_charges, contract_type]. " in (
        out.get()
    )


@pytest.mark.usefixtures("wide")
def test_the_summary_table_prints_brackets_in_its_cells_as_text() -> None:
    result = loop.LoopResult(
        tenants=["acme", "globex"],
        served={"acme": "churn-classifier.acme v1", "globex": "churn-classifier v1"},
        own_model={"acme": True, "globex": False},
        isolation=loop.Isolation("acme", "globex", 404, 200, 10, 0, 10, 0),
        calm={"acme": _outcome("calm [bold]"), "globex": _outcome()},
        drifted={"acme": _outcome(), "globex": _outcome()},
        retrained=["acme"],
        promoted=True,
        first_version="1",
        new_version="2",
        swap_seconds=3.0,
        requests=100,
        failed=0,
        old_after_swap=0,
        others_kept={"globex": ["1"]},
        monitoring_runs=4,
    )
    with loop.console.capture() as out:
        loop.print_summary(result)

    assert "s3://mlflow/1/[run]/monitoring/report.html" in out.get()
