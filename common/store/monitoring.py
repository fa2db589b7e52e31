"""Monitoring's side of PostgreSQL: windows of the prediction log in, headline numbers out.

A window is read with one `COPY (SELECT ...) TO STDOUT`: PostgreSQL takes the features
out of the logged JSON and joins the late labels, pyarrow parses the CSV. A million
logged predictions come back as a DataFrame in seconds without a row-by-row Python loop.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
from psycopg import sql

from common.params import DataParams
from common.store.connection import connect
from common.store.migrations import migrate
from common.store.tenants import scope, tenant_ids

REQUEST_ID = "request_id"
TS = "ts"
MODEL_VERSION = "model_version"
CHAMPION = "champion"
"""The variant of every row logged before variants existed and of a single-variant run."""


@dataclass(frozen=True)
class Window:
    """Which logged predictions one monitor run looks at.

    `model_version` None: every version; `variant` None: every variant (champion,
    challenger, shadow: predictions.variant).
    """

    model_name: str
    model_version: str | None
    start: datetime
    end: datetime
    variant: str | None = None


@dataclass(frozen=True)
class LiveVariant:
    """A variant that answered (or shadowed) some of a window's traffic, with one version."""

    variant: str
    model_version: str
    rows: int


def _select(
    data: DataParams,
    positive: str,
    prediction_column: str,
    probability_column: str,
    class_columns: Mapping[str, str] | None = None,
) -> sql.Composed:
    cols: list[sql.Composable] = [
        sql.SQL("p.request_id::text AS {}").format(sql.Identifier(REQUEST_ID)),
        sql.SQL("p.ts AS {}").format(sql.Identifier(TS)),
        sql.SQL("p.model_version AS {}").format(sql.Identifier(MODEL_VERSION)),
    ]
    for name, spec in data.features.items():
        value = sql.SQL("p.inputs ->> {}").format(sql.Literal(name))
        if spec.type == "numeric":
            # A value the service refused never got here; NaN/inf were refused too.
            value = sql.SQL("({})::float8").format(value)
        cols.append(sql.SQL("{} AS {}").format(value, sql.Identifier(name)))
    # P(positive) for a binary model; every class's probability for a multiclass one
    probabilities = dict(class_columns or {}) or {probability_column: positive}
    cols += [
        sql.SQL("p.predicted AS {}").format(sql.Identifier(prediction_column)),
        *(
            sql.SQL("(p.probabilities ->> {})::float8 AS {}").format(
                sql.Literal(label), sql.Identifier(column)
            )
            for column, label in probabilities.items()
        ),
        sql.SQL("f.label AS {}").format(sql.Identifier(data.target)),
    ]
    return sql.SQL(", ").join(cols)


_JOIN_LABEL = sql.SQL("ON f.tenant_id = p.tenant_id AND f.request_id = p.request_id")


def _scope(conn: Any, tenants: Sequence[str] | None) -> None:
    """Scope the transaction to `tenants`, or to every tenant there is."""
    scope(conn, tenant_ids(conn) if tenants is None else tenants)


def _of_tenants(tenants: Sequence[str] | None) -> sql.Composed:
    """The rows of `tenants` (None: every tenant's) also in the query itself, so a role that
    row-level security does not bind (a superuser DATABASE_URL) reads no other tenant's."""
    if tenants is None:
        return sql.Composed([sql.SQL("TRUE")])
    return sql.SQL("p.tenant_id = ANY({})").format(sql.Literal(list(tenants)))


def _copy_frame(
    conn: Any, query: sql.Composable, data: DataParams, text: Sequence[str]
) -> pd.DataFrame:
    buf = io.BytesIO()
    copy_sql = sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv, HEADER true)").format(query)
    with conn.cursor() as cur, cur.copy(copy_sql) as copy:
        for chunk in copy:
            buf.write(chunk)
    buf.seek(0)
    types = {name: pa.string() for name in text}
    types.update({n: pa.float64() for n in data.numeric})
    table = pacsv.read_csv(
        buf,
        convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=True),
    )
    frame: pd.DataFrame = table.to_pandas()
    return frame


def read_window(
    database_url: str,
    window: Window,
    data: DataParams,
    *,
    positive_class: str,
    prediction_column: str = "predicted",
    probability_column: str = "proba_1",
    class_columns: Mapping[str, str] | None = None,
    tenants: Sequence[str] | None = None,
    max_rows: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """The window's predictions: features, predicted class, P(positive), label or missing.

    `max_rows` bounds what is read, whatever the window's length or traffic: a larger
    window comes back as a sample of that many rows (the same for the same `seed`), drawn by
    PostgreSQL, so neither it nor this process holds more than that.

    `class_columns` ({column: class}, a multiclass model's) replaces P(positive) with each
    class's logged probability. Labels (the target column) are text as logged;
    `target_like` converts them. `tenants` limits the window to their traffic; None reads
    every tenant's (the shared model's monitor).
    """
    migrate(database_url)
    where = [
        sql.SQL("p.model_name = {}").format(sql.Literal(window.model_name)),
        sql.SQL("p.ts >= {}").format(sql.Literal(window.start)),
        sql.SQL("p.ts < {}").format(sql.Literal(window.end)),
    ]
    if window.model_version is not None:
        where.append(sql.SQL("p.model_version = {}").format(sql.Literal(window.model_version)))
    if window.variant is not None:
        where.append(sql.SQL("p.variant = {}").format(sql.Literal(window.variant)))
    where.append(_of_tenants(tenants))
    query = sql.SQL("SELECT {} FROM predictions p LEFT JOIN feedback f {} WHERE {}").format(
        _select(data, positive_class, prediction_column, probability_column, class_columns),
        _JOIN_LABEL,
        sql.SQL(" AND ").join(where),
    )
    count = sql.SQL("SELECT count(*) FROM predictions p WHERE {}").format(
        sql.SQL(" AND ").join(where)
    )
    text = [REQUEST_ID, MODEL_VERSION, *data.categorical, prediction_column, data.target]
    with connect(database_url, statement_timeout=None) as conn, conn.transaction():
        _scope(conn, tenants)
        row = conn.execute(count).fetchone() if max_rows is not None else None
        if max_rows is not None and row is not None and row[0] > max_rows:
            # a seeded sample: the rows with the smallest hashes of their ids
            query = sql.SQL("{} ORDER BY md5(p.request_id::text || {}) LIMIT {}").format(
                query, sql.Literal(str(seed)), sql.Literal(max_rows)
            )
        query = sql.SQL("SELECT * FROM ({}) w ORDER BY {}").format(query, sql.Identifier(TS))
        return _copy_frame(conn, query, data, text)


def live_variants(
    database_url: str, window: Window, tenants: Sequence[str] | None = None
) -> list[LiveVariant]:
    """Each (variant, version) of the window's model with rows in its time range, and how many.

    The window's own version and variant are not looked at: this is what else was live.
    `tenants` as `read_window`'s. Ordered champion, challenger, shadow, then by version.
    """
    migrate(database_url)
    query = sql.SQL(
        "SELECT p.variant, p.model_version, count(*) FROM predictions p"
        " WHERE p.model_name = {} AND p.ts >= {} AND p.ts < {} AND {}"
        " GROUP BY 1, 2"
        " ORDER BY array_position(ARRAY['champion', 'challenger', 'shadow'], p.variant), 2"
    ).format(
        sql.Literal(window.model_name),
        sql.Literal(window.start),
        sql.Literal(window.end),
        _of_tenants(tenants),
    )
    with connect(database_url, statement_timeout=None) as conn, conn.transaction():
        _scope(conn, tenants)
        rows = conn.execute(query).fetchall()
    return [LiveVariant(str(v), str(version), int(n)) for v, version, n in rows]


def labelled_rows(
    database_url: str,
    model_name: str | Sequence[str],
    data: DataParams,
    tenants: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Every logged prediction of `model_name` (one or several) that has its true label.

    Features and target; the request id goes in the id column, so `prepare` keeps each row
    on its side of the split. `tenants` limits the rows to their traffic; None reads every
    tenant's.
    """
    names = [model_name] if isinstance(model_name, str) else list(model_name)
    migrate(database_url)
    id_column = data.id_column or REQUEST_ID
    cols: list[sql.Composable] = [
        sql.SQL("p.request_id::text AS {}").format(sql.Identifier(id_column))
    ]
    for name, spec in data.features.items():
        value = sql.SQL("p.inputs ->> {}").format(sql.Literal(name))
        if spec.type == "numeric":
            value = sql.SQL("({})::float8").format(value)
        cols.append(sql.SQL("{} AS {}").format(value, sql.Identifier(name)))
    cols.append(sql.SQL("f.label AS {}").format(sql.Identifier(data.target)))
    query = sql.SQL(
        "SELECT {} FROM predictions p JOIN feedback f {}"
        " WHERE p.model_name = ANY({}) AND {} ORDER BY p.ts, p.request_id"
    ).format(sql.SQL(", ").join(cols), _JOIN_LABEL, sql.Literal(names), _of_tenants(tenants))
    with connect(database_url, statement_timeout=None) as conn, conn.transaction():
        _scope(conn, tenants)
        return _copy_frame(conn, query, data, [id_column, *data.categorical, data.target])


def target_like(labels: pd.Series, reference: pd.Series) -> pd.Series:
    """Logged labels/predictions are text; give them the reference target's dtype.

    Whole-number classes stay whole numbers when some labels have not arrived (nullable
    Int64, not float): 1.0 against the reference's 1 would read as a new class.
    """
    if pd.api.types.is_integer_dtype(reference):
        numbers = pd.to_numeric(labels, errors="coerce")
        whole = numbers.dropna()
        if (whole == whole.round()).all():
            return numbers.astype("Int64")
        return numbers
    if pd.api.types.is_numeric_dtype(reference):
        return pd.to_numeric(labels, errors="coerce")
    return labels


@dataclass(frozen=True)
class RunRecord:
    """One monitor run, as `monitoring_runs` keeps it."""

    run_id: str
    model_name: str
    model_version: str
    window_start: datetime
    window_end: datetime
    current_rows: int
    labelled_rows: int
    enough_rows: bool
    drift_detected: bool
    summary: str
    mlflow_run_id: str | None = None
    report_uri: str | None = None
    evidently_project: str | None = None
    tenant_id: str | None = None  # None: the shared model, over every tenant's traffic
    variant: str = CHAMPION  # whose traffic: champion, challenger or shadow


def new_run_id() -> str:
    return str(uuid.uuid4())


def write_results(
    database_url: str, run: RunRecord, metrics: Sequence[tuple[str, str | None, float]]
) -> None:
    """The run and its (metric, column, value) rows, in one transaction; rerunning replaces them."""
    migrate(database_url)
    fields = list(RunRecord.__dataclass_fields__)
    with connect(database_url) as conn, conn.transaction():
        if run.tenant_id is not None:
            scope(conn, run.tenant_id)
        conn.execute("DELETE FROM monitoring_runs WHERE run_id = %s", [run.run_id])
        conn.execute(
            sql.SQL("INSERT INTO monitoring_runs ({}) VALUES ({})").format(
                sql.SQL(", ").join(map(sql.Identifier, fields)),
                sql.SQL(", ").join(sql.Placeholder() * len(fields)),
            ),
            [getattr(run, f) for f in fields],
        )
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO monitoring_metrics (run_id, window_end, model_name, model_version,"
                " metric, column_name, value, tenant_id, variant)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [
                    (
                        run.run_id,
                        run.window_end,
                        run.model_name,
                        run.model_version,
                        metric,
                        column or "",
                        float(value),
                        run.tenant_id,
                        run.variant,
                    )
                    for metric, column, value in metrics
                ],
            )


def history(
    database_url: str,
    model_name: str,
    metric: str,
    tenant: str | None = None,
    variant: str = CHAMPION,
) -> list[dict[str, Any]]:
    """A metric over time (window end, version, column, value): what a dashboard charts.

    `tenant` None is the shared model's monitoring; a tenant id, that tenant's own.
    `variant` picks whose traffic: the champion's by default, or a challenger's or shadow's.
    """
    with connect(database_url) as conn, conn.transaction():
        if tenant is not None:
            scope(conn, tenant)
        rows = conn.execute(
            "SELECT window_end, model_version, column_name, value FROM monitoring_metrics"
            " WHERE model_name = %s AND metric = %s AND tenant_id IS NOT DISTINCT FROM %s"
            " AND variant = %s ORDER BY window_end, column_name",
            [model_name, metric, tenant, variant],
        ).fetchall()
    return [
        {"window_end": r[0], "model_version": r[1], "column": r[2] or None, "value": r[3]}
        for r in rows
    ]


def dumps_metrics(metrics: Sequence[tuple[str, str | None, float]]) -> str:
    return json.dumps([{"metric": m, "column": c, "value": v} for m, c, v in metrics])
