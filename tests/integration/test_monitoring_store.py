"""Monitoring's reads and writes against a real PostgreSQL: windows, labels, headline rows."""

from __future__ import annotations

import json
import math
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from common.localpg import LocalPostgres
from common.params import load_params
from common.store import (
    Feedback,
    Prediction,
    connect,
    create_staging,
    migrate,
    monitoring,
    write_items,
)
from models.generate import generate

pytestmark = pytest.mark.integration

DATA = load_params().data
T0 = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture
def database(postgres: LocalPostgres) -> str:
    postgres.start()
    name = f"monitoring_{uuid.uuid4().hex[:12]}"
    postgres.create_database(name)
    migrate(postgres.url(name))
    return postgres.url(name)


def _inputs(row: pd.Series) -> dict[str, object]:
    return {
        str(k): (None if isinstance(v, float) and math.isnan(v) else v)
        for k, v in row[DATA.feature_names].items()
    }


def log_rows(url: str, df: pd.DataFrame, version: str, start: datetime, labels: int) -> list[str]:
    """Log df's rows as predictions one second apart; the first `labels` get feedback."""
    items: list[Prediction | Feedback] = []
    ids = []
    for i, (_, row) in enumerate(df.iterrows()):
        rid = str(uuid.uuid4())
        ids.append(rid)
        p1 = 0.9 if row["churned"] else 0.2
        items.append(
            Prediction(
                rid,
                start + timedelta(seconds=i),
                "churn-classifier",
                version,
                _inputs(row),
                str(int(p1 > 0.5)),
                {"0": 1 - p1, "1": p1},
                1.0,
                "default",
            )
        )
        if i < labels:
            items.append(Feedback(rid, str(row["churned"]), start + timedelta(days=2), "default"))
    with connect(url) as conn:
        create_staging(conn)
        write_items(conn, items)
    return ids


def test_a_window_comes_back_typed_with_its_late_labels(database: str) -> None:
    df = generate(300, seed=1)
    log_rows(database, df, "3", T0, labels=120)
    log_rows(database, generate(50, seed=2), "2", T0, labels=0)  # another version
    window = monitoring.Window("churn-classifier", "3", T0, T0 + timedelta(hours=1))

    got = monitoring.read_window(database, window, DATA, positive_class="1")

    assert len(got) == 300
    assert set(got["model_version"]) == {"3"}
    for col in DATA.numeric:
        assert got[col].dtype == "float64"
        pd.testing.assert_series_equal(
            got[col].reset_index(drop=True), df[col].astype("float64"), check_names=False
        )
    for col in DATA.categorical:
        assert got[col].tolist() == [None if pd.isna(v) else v for v in df[col]]
    assert got["churned"].notna().sum() == 120
    labels = monitoring.target_like(got["churned"], df["churned"])
    assert labels.head(120).astype(int).tolist() == df["churned"].head(120).tolist()
    assert got["proba_1"].between(0, 1).all()


def test_a_window_is_bounded_by_time(database: str) -> None:
    log_rows(database, generate(100, seed=3), "1", T0, labels=0)
    window = monitoring.Window(
        "churn-classifier", None, T0 + timedelta(seconds=10), T0 + timedelta(seconds=20)
    )
    got = monitoring.read_window(database, window, DATA, positive_class="1")
    assert len(got) == 10


def test_labelled_rows_carry_the_request_id_as_their_id(database: str) -> None:
    df = generate(200, seed=4)
    ids = log_rows(database, df, "1", T0, labels=80)
    rows = monitoring.labelled_rows(database, "churn-classifier", DATA)
    assert len(rows) == 80
    assert rows[DATA.id_column or "request_id"].tolist() == ids[:80]
    assert set(rows.columns) == {DATA.id_column, *DATA.feature_names, DATA.target}


def test_results_are_kept_and_chart_over_time(database: str) -> None:
    for day in range(3):
        run = monitoring.RunRecord(
            run_id=monitoring.new_run_id(),
            model_name="churn-classifier",
            model_version="1",
            window_start=T0 + timedelta(days=day),
            window_end=T0 + timedelta(days=day + 1),
            current_rows=5000,
            labelled_rows=100,
            enough_rows=True,
            drift_detected=day == 2,
            summary="...",
        )
        monitoring.write_results(
            database,
            run,
            [("share_drifted", None, day / 10), ("drift_score", "tenure_months", 0.01 * day)],
        )
        monitoring.write_results(database, run, [("share_drifted", None, day / 10)])  # rerun

    history = monitoring.history(database, "churn-classifier", "share_drifted")
    assert [h["value"] for h in history] == [0.0, 0.1, 0.2]
    assert monitoring.history(database, "churn-classifier", "drift_score") == []


GRAFANA_DASHBOARDS = Path(__file__).resolve().parents[2] / "infra/docker/grafana/dashboards"


def _grafana_sql(raw: str) -> str:
    """Grafana's PostgreSQL macros, expanded as Grafana does for a wide time range, and the
    dashboard's `tenant` variable with the shared model and one tenant picked."""
    raw = raw.replace("$tenant", "'shared','acme'")
    raw = re.sub(r"\$__timeGroupAlias\((\w+), *'1h'\)", r"date_trunc('hour', \1) AS time", raw)
    return re.sub(
        r"\$__timeFilter\((\w+)\)",
        r"\1 BETWEEN '2026-01-01T00:00:00Z' AND '2027-01-01T00:00:00Z'",
        raw,
    )


def test_the_grafana_dashboard_queries_run_on_the_monitoring_tables(database: str) -> None:
    """Every SQL panel of the provisioned dashboard, on a database the monitor flow wrote."""
    log_rows(database, generate(30, seed=5), "1", T0, labels=10)
    run = monitoring.RunRecord(
        run_id=monitoring.new_run_id(),
        model_name="churn-classifier",
        model_version="1",
        window_start=T0,
        window_end=T0 + timedelta(hours=1),
        current_rows=30,
        labelled_rows=10,
        enough_rows=True,
        drift_detected=False,
        summary="...",
    )
    monitoring.write_results(
        database,
        run,
        [("share_drifted", None, 0.1), ("drift_score", "age", 0.02), ("roc_auc", None, 0.8)],
    )
    panels = [
        p
        for path in sorted(GRAFANA_DASHBOARDS.glob("*.json"))
        for p in json.loads(path.read_text())["panels"]
        if p["datasource"]["uid"] == "monitoring-pg"
    ]
    assert len(panels) >= 3  # the rest read Prometheus
    variables = [
        v
        for path in sorted(GRAFANA_DASHBOARDS.glob("*.json"))
        for v in json.loads(path.read_text())["templating"]["list"]
    ]
    with connect(database) as conn:
        for panel in panels:
            rows = conn.execute(_grafana_sql(panel["targets"][0]["rawSql"])).fetchall()
            assert rows, panel["title"]
        (tenant,) = variables
        assert ("shared",) in conn.execute(tenant["query"]).fetchall()


def test_a_window_over_max_rows_is_read_as_the_same_sample_of_that_many(database: str) -> None:
    ids = log_rows(database, generate(200, seed=4), "1", T0, labels=50)
    window = monitoring.Window("churn-classifier", "1", T0, T0 + timedelta(hours=1))

    got = monitoring.read_window(database, window, DATA, positive_class="1", max_rows=60, seed=7)
    again = monitoring.read_window(database, window, DATA, positive_class="1", max_rows=60, seed=7)
    other = monitoring.read_window(database, window, DATA, positive_class="1", max_rows=60, seed=8)
    whole = monitoring.read_window(database, window, DATA, positive_class="1", max_rows=200)

    assert len(got) == 60
    assert set(got["request_id"]) <= set(ids)
    assert got["ts"].is_monotonic_increasing
    assert got["request_id"].tolist() == again["request_id"].tolist()
    assert set(got["request_id"]) != set(other["request_id"])
    assert whole["request_id"].tolist() == ids
