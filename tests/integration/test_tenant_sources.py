"""A tenant's training data from a real PostgreSQL table, through a read-only role.

`dvc repro tenant-validate@acme` snapshots what acme's query returns into its DVC-tracked
file and checks it against the data contract; a query that returns the wrong columns, or
fails, or would write, stops with one paragraph naming the tenant, the source and why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd
import psycopg
import pytest
import yaml
from psycopg import sql

from common import paths
from common import snapshot as reader
from common.errors import UserError
from common.lineage import file_md5
from common.localpg import LocalPostgres
from common.params import TenantSource
from common.settings import Settings
from models.generate import tenant_source
from tests.servers import DVC_BUCKET, S3Endpoint
from tests.workspace import Workspace, make_workspace

ROWS = 1200
QUERY = "SELECT * FROM crm.customers WHERE churned IS NOT NULL"


@dataclass(frozen=True)
class Crm:
    """A tenant's own database: its customers table, an owner and a read-only role."""

    owner_url: str
    reader_url: str
    rows: pd.DataFrame


def _pg_type(values: pd.Series) -> str:
    if pd.api.types.is_integer_dtype(values):
        return "bigint"
    return "double precision" if pd.api.types.is_numeric_dtype(values) else "text"


@pytest.fixture(scope="module")
def crm(postgres: LocalPostgres) -> Crm:
    postgres.create_database("crm")
    rows = tenant_source("acme", ROWS)
    columns = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(_pg_type(rows[c]))) for c in rows.columns
    )
    with postgres.connect("crm") as conn:
        conn.execute("CREATE SCHEMA crm")
        conn.execute(
            sql.SQL("CREATE TABLE crm.customers ({}, note text DEFAULT 'from the CRM')").format(
                columns
            )
        )
        with conn.cursor() as cur:
            names = sql.SQL(", ").join(sql.Identifier(c) for c in rows.columns)
            copy = sql.SQL("COPY crm.customers ({}) FROM STDIN").format(names)
            with cur.copy(copy) as out:
                cells = rows.astype(object).where(rows.notna(), other=None)  # type: ignore[call-overload]
                for record in cells.itertuples(index=False):
                    out.write_row(record)
        conn.execute("CREATE ROLE crm_reader LOGIN PASSWORD 'reader-secret'")
        conn.execute("GRANT USAGE ON SCHEMA crm TO crm_reader")
        conn.execute("GRANT SELECT ON crm.customers TO crm_reader")
        # A query may call a function that writes: the snapshot's transaction must stop it.
        conn.execute(
            "CREATE FUNCTION crm.purge() RETURNS SETOF crm.customers LANGUAGE sql AS "
            "'DELETE FROM crm.customers RETURNING *'"
        )
    reader_url = f"postgresql://crm_reader:reader-secret@127.0.0.1:{postgres.port}/crm"
    return Crm(postgres.url("crm"), reader_url, rows)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, crm: Crm) -> Workspace:
    ws = make_workspace(
        tmp_path_factory.mktemp("tenant-sql") / "ws", env={"ACME_DB_URL": crm.reader_url}
    )
    ws.set_params({"tenants": {"acme": {"source": {"sql": QUERY, "url_env": "ACME_DB_URL"}}}})
    ws.run("git", "commit", "-qam", "acme reads its CRM")
    return ws


def test_a_sql_source_is_snapshotted_and_validated_before_anything_else_runs(
    ws: Workspace, crm: Crm
) -> None:
    out = ws.run("dvc", "repro", "tenant-validate@acme").stdout

    assert "Running stage 'tenant-snapshot@acme'" in out
    assert "Running stage 'tenant-train@acme'" not in out
    acme = paths.layout("acme")
    snapshot = pd.read_parquet(ws.path / acme.SNAPSHOT)
    assert sorted(snapshot["customer_id"]) == sorted(crm.rows["customer_id"])
    assert "note" not in snapshot  # only the data contract's columns are kept
    pd.testing.assert_series_equal(
        snapshot.set_index("customer_id")["tenure_months"].sort_index(),
        crm.rows.set_index("customer_id")["tenure_months"].astype(float).sort_index(),
    )
    lock = yaml.safe_load((ws.path / "dvc.lock").read_text())["stages"]
    (out_entry,) = lock["tenant-snapshot@acme"]["outs"]
    assert out_entry["md5"] == file_md5(ws.path / acme.SNAPSHOT)
    assert lock["tenant-snapshot@acme"]["params"]["params.yaml"]["tenants.acme.source"] == {
        "sql": QUERY,
        "url_env": "ACME_DB_URL",
    }
    report = json.loads((ws.path / acme.VALIDATION_REPORT).read_text())
    assert (report["passed"], report["tenant"], report["rows"]) == (True, "acme", ROWS)


def test_a_query_with_the_wrong_columns_stops_with_one_paragraph(ws: Workspace) -> None:
    wrong = "SELECT customer_id, churned AS churn FROM crm.customers"
    ws.set_params({"tenants": {"acme": {"source": {"sql": wrong}}}})
    try:
        proc = ws.python("-m", "models.snapshot", "--tenant", "acme", check=False)
    finally:
        ws.run("git", "checkout", "params.yaml")

    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(
        f"error: tenant 'acme', source SQL via $ACME_DB_URL: {wrong}: the data lacks column(s) "
        "['tenure_months', "
    )
    assert "it has ['customer_id', 'churn']" in line
    assert "reader-secret" not in line


def test_a_failing_query_names_the_tenant_the_source_and_the_database_error(
    crm: Crm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACME_DB_URL", crm.reader_url)
    source = TenantSource(sql="SELECT * FROM crm.customer", url_env="ACME_DB_URL")

    with pytest.raises(UserError) as raised:
        reader.read("acme", source, Settings())

    assert str(raised.value) == (
        "tenant 'acme', source SQL via $ACME_DB_URL: SELECT * FROM crm.customer: the query "
        'failed (relation "crm.customer" does not exist)'
    )


def test_the_snapshot_transaction_is_read_only_whatever_the_role_may_do(
    crm: Crm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACME_DB_URL", crm.owner_url)  # the owner could delete the rows
    deleting = "SELECT * FROM crm.purge()"

    with pytest.raises(UserError, match=r"cannot execute DELETE in a read-only transaction"):
        reader.read("acme", TenantSource(sql=deleting, url_env="ACME_DB_URL"), Settings())

    with psycopg.connect(crm.owner_url) as conn:
        count = conn.execute("SELECT count(*) FROM crm.customers").fetchone()
    assert count == (ROWS,)


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_an_s3_source_is_read_from_the_bucket_and_a_missing_object_is_named(
    s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    """The same reader as batch scoring's, against a real S3 endpoint (moto's server)."""
    rows = tenant_source("acme", 200)
    body = (
        rows.to_parquet(index=False) if suffix == "parquet" else rows.to_csv(index=False).encode()
    )
    key = f"sources/acme.{suffix}"
    s3.client().put_object(Bucket=DVC_BUCKET, Key=key, Body=body)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3.url)
    for name, value in s3.creds.items():
        monkeypatch.setenv(name, value)

    got = reader.read("acme", TenantSource(path=f"s3://{DVC_BUCKET}/{key}"), Settings())

    assert sorted(got["customer_id"]) == sorted(rows["customer_id"])
    assert (
        got["tenure_months"].astype(float).tolist() == rows["tenure_months"].astype(float).tolist()
    )
    missing = f"s3://{DVC_BUCKET}/sources/initech.{suffix}"
    with pytest.raises(UserError, match=rf"^tenant 'initech', source {missing}: "):
        reader.read("initech", TenantSource(path=missing), Settings())
