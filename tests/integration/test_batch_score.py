"""The batch_score flow against a real MLflow server, PostgreSQL and an S3 endpoint.

The flow runs in-process under Prefect's test harness (a temporary API). It scores the
pipeline's champion on a Parquet file in the bucket, on a local CSV with garbage rows and
on a PostgreSQL table in the database of DATABASE_URL; and for a tenant, with its own
champion or the shared one, its rows logged as that tenant's.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from common.errors import UserError
from common.localpg import LocalPostgres
from common.settings import get_settings
from common.store import sources
from flows.batch_score import batch_score
from models.batch import BatchResult
from models.generate import generate
from tests.integration.serving import register_copies
from tests.servers import PREFECT_STARTUP_TIMEOUT, HttpServer, S3Endpoint, free_port
from tests.workspace import Workspace

BUCKET = "batches"
ROWS = 3_000
TABLE = "staging.incoming"
TABLE_ROWS = 2_000  # three chunks of 700
BAD_TABLE_ROWS = {100: "region: unknown category 'moon'", 1_500: "monthly_charges: not finite"}

pytestmark = pytest.mark.usefixtures("harness")


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=PREFECT_STARTUP_TIMEOUT):
        yield


@pytest.fixture(scope="module")
def logdb(postgres: LocalPostgres) -> str:
    postgres.create_database("batchlog")
    return postgres.url("batchlog")


@pytest.fixture(scope="module")
def project(
    tmp_path_factory: pytest.TempPathFactory,
    pipeline: Workspace,
    mlflow_server: HttpServer,
    s3: S3Endpoint,
    logdb: str,
) -> Iterator[Path]:
    """A directory with the pipeline's params (small chunks) and the stack's environment."""
    root = tmp_path_factory.mktemp("batch")
    params = yaml.safe_load((pipeline.path / "params.yaml").read_text())
    params["batch_score"] = {"chunk_rows": 700}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for name, value in {
            "MLOPS_HOME": str(root / ".mlops"),
            "MLFLOW_TRACKING_URI": mlflow_server.url,
            "MLFLOW_S3_ENDPOINT_URL": s3.url,
            "DATABASE_URL": logdb,
            **s3.creds,
        }.items():
            mp.setenv(name, value)
        get_settings.cache_clear()
        yield root
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def s3_parquet(s3: S3Endpoint, project: Path) -> str:
    generate(ROWS, seed=21).to_parquet(project / "up.parquet")
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    client.upload_file(str(project / "up.parquet"), BUCKET, "in/customers.parquet")
    return f"s3://{BUCKET}/in/customers.parquet"


@pytest.fixture(scope="module")
def garbage_csv(project: Path) -> Path:
    df = generate(1_000, seed=22).astype({"age": object, "region": object, "tenure_months": object})
    df.loc[10, "age"] = "n/a years"
    df.loc[20, "region"] = "moon"
    df.loc[30, "tenure_months"] = "12;DROP TABLE"
    path = project / "garbage.csv"
    df.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def incoming(logdb: str) -> pd.DataFrame:
    """staging.incoming with typed columns, filled in shuffled order; its rows in id order."""
    df = generate(TABLE_ROWS, seed=23).drop(columns=["churned"])
    df["num_products"] = df["num_products"].astype("int64")
    df.loc[100, "region"] = "moon"
    df.loc[1_500, "monthly_charges"] = np.inf
    sql_type = {"customer_id": "text primary key", "num_products": "integer"}
    columns = ", ".join(
        f"{c} {sql_type.get(c, 'double precision' if df[c].dtype.kind == 'f' else 'text')}"
        for c in df.columns
    )
    shuffled = io.StringIO()
    df.sample(frac=1, random_state=0).to_csv(shuffled, index=False, header=False)
    with psycopg.connect(logdb) as conn:
        conn.execute("CREATE SCHEMA staging")
        conn.execute(f"CREATE TABLE {TABLE} ({columns}, loaded_at timestamptz DEFAULT now())")
        with conn.cursor().copy(f"COPY {TABLE} ({', '.join(df.columns)}) FROM STDIN CSV") as cp:
            cp.write(shuffled.getvalue())
    return df


def logged(database_url: str, ids: list[str]) -> list[tuple[str, str, str]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT request_id::text, model_version, batch_id FROM predictions"
            " WHERE request_id = ANY(%s::uuid[]) ORDER BY request_id",
            [ids],
        ).fetchall()
    return [(str(a), str(b), str(c)) for a, b, c in rows]


def total_logged(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM predictions").fetchone()
    return int(row[0]) if row else 0


def test_scores_a_parquet_in_s3_into_parquet_and_the_log(
    project: Path, s3_parquet: str, logdb: str
) -> None:
    result = batch_score(s3_parquet, batch_id="s3-one", output_dir="out")
    assert isinstance(result, BatchResult)
    assert (result.rows, result.scored, result.rejected) == (ROWS, ROWS, 0)
    assert result.logged == ROWS
    scored = pd.read_parquet(project / "out" / "s3-one" / "predictions.parquet")
    assert len(scored) == ROWS
    assert set(scored["batch_id"]) == {"s3-one"}
    assert set(scored["model_version"]) == {result.model_version}
    assert scored["customer_id"].is_unique
    np.testing.assert_allclose(scored[["proba_0", "proba_1"]].sum(axis=1), 1.0, atol=1e-5)
    in_log = logged(logdb, scored["request_id"].tolist())
    assert len(in_log) == ROWS
    assert {v for _, v, _ in in_log} == {result.model_version}
    assert {b for _, _, b in in_log} == {"s3-one"}


def test_an_s3_output_gets_both_files_once_the_batch_succeeded(
    project: Path, s3_parquet: str, s3: S3Endpoint, logdb: str
) -> None:
    result = batch_score(s3_parquet, batch_id="to-s3", output_dir=f"s3://{BUCKET}/scored/")
    assert result.published == f"s3://{BUCKET}/scored/to-s3"
    assert sorted(s3.keys(BUCKET, "scored/")) == [
        "scored/to-s3/predictions.parquet",
        "scored/to-s3/rejects.parquet",
    ]
    body = s3.client().get_object(Bucket=BUCKET, Key="scored/to-s3/predictions.parquet")["Body"]
    scored = pd.read_parquet(io.BytesIO(body.read()))
    assert len(scored) == result.scored == ROWS
    assert set(scored["batch_id"]) == {"to-s3"}


def test_an_s3_output_in_a_missing_bucket_is_refused_by_name(
    project: Path, s3_parquet: str
) -> None:
    with pytest.raises(UserError, match="s3://no-such-bucket/x/refused"):
        batch_score(s3_parquet, batch_id="refused", output_dir="s3://no-such-bucket/x")


def test_rerunning_a_batch_id_adds_no_rows(project: Path, s3_parquet: str, logdb: str) -> None:
    before = total_logged(logdb)
    first = pd.read_parquet(project / "out" / "s3-one" / "predictions.parquet")
    result = batch_score(s3_parquet, batch_id="s3-one", output_dir="out")
    assert result.logged == 0
    assert total_logged(logdb) == before
    again = pd.read_parquet(project / "out" / "s3-one" / "predictions.parquet")
    pd.testing.assert_frame_equal(first, again)


def test_garbage_rows_go_to_rejects_with_reasons(
    project: Path, garbage_csv: Path, logdb: str
) -> None:
    result = batch_score(str(garbage_csv), output_dir="out")
    assert (result.scored, result.rejected) == (997, 3)
    assert result.logged == 997
    rejects = pd.read_parquet(result.rejects_path)
    assert dict(zip(rejects["row_number"], rejects["reason"], strict=True)) == {
        10: "age: not a number 'n/a years'",
        20: "region: unknown category 'moon'",
        30: "tenure_months: not a number '12;DROP TABLE'",
    }
    scored = pd.read_parquet(result.predictions_path)
    assert len(logged(logdb, scored["request_id"].tolist())) == 997
    # no batch id given: the default is stable for an unchanged file
    assert batch_score(str(garbage_csv), output_dir="out").batch_id == result.batch_id


def expect_failure(source: str, *, match: str, out: Path) -> None:
    state = batch_score(source, batch_id="bad", output_dir=str(out), return_state=True)
    assert state.is_failed()
    assert match in str(state.message)
    assert not (out / "bad").exists()


def test_a_missing_file_fails_the_run_naming_it(project: Path, logdb: str) -> None:
    before = total_logged(logdb)
    expect_failure(
        f"s3://{BUCKET}/in/nope.parquet", match="nope.parquet: no such file", out=project / "out"
    )
    expect_failure(str(project / "nope.csv"), match="nope.csv: no such file", out=project / "out")
    assert total_logged(logdb) == before


def test_missing_columns_refuse_the_batch_before_writing(project: Path, logdb: str) -> None:
    before = total_logged(logdb)
    path = project / "narrow.parquet"
    generate(100, seed=1).drop(columns=["plan_tier"]).to_parquet(path)
    expect_failure(str(path), match="missing column(s) ['plan_tier']", out=project / "out")
    assert total_logged(logdb) == before


def test_an_unreachable_mlflow_fails_the_run_naming_it(
    project: Path, garbage_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    get_settings.cache_clear()
    try:
        expect_failure(str(garbage_csv), match=f"MLFLOW_TRACKING_URI={uri}", out=project / "out")
    finally:
        get_settings.cache_clear()


def test_scores_a_table_in_chunks_like_the_same_rows_in_a_file(
    project: Path, incoming: pd.DataFrame, logdb: str
) -> None:
    inp = sources.open_input(f"table:{TABLE}", database_url=logdb)
    assert [b.num_rows for b in sources.read_chunks(inp, ["customer_id"], 700)] == [700, 700, 600]

    result = batch_score(f"table:{TABLE}", batch_id="tbl-one", output_dir="out")
    good = TABLE_ROWS - len(BAD_TABLE_ROWS)
    assert (result.rows, result.scored, result.rejected) == (TABLE_ROWS, good, 2)
    assert result.logged == good
    rejects = pd.read_parquet(result.rejects_path)
    assert dict(zip(rejects["row_number"], rejects["reason"], strict=True)) == BAD_TABLE_ROWS
    scored = pd.read_parquet(result.predictions_path)
    # rows come in id order, whatever order they were inserted in
    expected_ids = incoming["customer_id"].drop(list(BAD_TABLE_ROWS)).tolist()
    assert scored["customer_id"].tolist() == expected_ids
    assert set(scored["model_version"]) == {result.model_version}
    in_log = logged(logdb, scored["request_id"].tolist())
    assert len(in_log) == good
    assert {b for _, _, b in in_log} == {"tbl-one"}

    path = project / "incoming.parquet"
    incoming.to_parquet(path)
    from_file = batch_score(str(path), batch_id="tbl-file", output_dir="out")
    same = ["row_number", "customer_id", "predicted", "proba_0", "proba_1"]
    pd.testing.assert_frame_equal(scored[same], pd.read_parquet(from_file.predictions_path)[same])
    pd.testing.assert_frame_equal(
        rejects[["row_number", "reason"]],
        pd.read_parquet(from_file.rejects_path)[["row_number", "reason"]],
    )


def test_rescoring_a_table_adds_no_rows_until_it_changes(
    project: Path, incoming: pd.DataFrame, logdb: str
) -> None:
    before = total_logged(logdb)
    first = pd.read_parquet(project / "out" / "tbl-one" / "predictions.parquet")
    again = batch_score(f"table:{TABLE}", batch_id="tbl-one", output_dir="out")
    assert again.logged == 0
    assert total_logged(logdb) == before
    pd.testing.assert_frame_equal(first, pd.read_parquet(again.predictions_path))

    # without a batch id, the id follows the table's content
    default = batch_score(f"table:{TABLE}", output_dir="out")
    assert default.batch_id.startswith("incoming-")
    stamp = sources.default_batch_id(sources.open_input(f"table:{TABLE}", database_url=logdb))
    assert stamp == default.batch_id
    with psycopg.connect(logdb) as conn:
        conn.execute(
            f"UPDATE {TABLE} SET age = 40 WHERE customer_id = %s", [incoming["customer_id"][0]]
        )
    changed = sources.default_batch_id(sources.open_input(f"table:{TABLE}", database_url=logdb))
    assert changed != default.batch_id


def test_a_missing_table_or_column_fails_the_run_naming_it(
    project: Path, incoming: pd.DataFrame, logdb: str
) -> None:
    before = total_logged(logdb)
    expect_failure(
        "table:staging.nope",
        match="table:staging.nope: no table or view 'staging.nope'",
        out=project / "out",
    )
    narrow = ", ".join(c for c in incoming.columns if c != "plan_tier")
    with psycopg.connect(logdb) as conn:
        conn.execute(f"CREATE VIEW staging.narrow AS SELECT {narrow} FROM {TABLE}")
    expect_failure(
        "table:staging.narrow",
        match="table:staging.narrow: missing column(s) ['plan_tier']",
        out=project / "out",
    )
    assert total_logged(logdb) == before


TENANT_ROWS = 300


@pytest.fixture(scope="module")
def tenant_file(project: Path, mlflow_server: HttpServer) -> Path:
    """A small file, and tenant `batchco` with a model of its own (champion v2)."""
    client = register_copies(mlflow_server.url, f"{get_settings().model_name}.batchco")
    client.set_registered_model_alias(f"{get_settings().model_name}.batchco", "champion", "2")
    path = project / "tenant.parquet"
    generate(TENANT_ROWS, seed=24).to_parquet(path)
    return path


def tenant_rows(database_url: str, batch_id: str) -> set[tuple[str, str, str]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT DISTINCT tenant_id, model_name, model_version FROM predictions"
            " WHERE batch_id = %s",
            [batch_id],
        ).fetchall()
    return {(str(t), str(n), str(v)) for t, n, v in rows}


def test_a_tenants_batch_is_scored_with_its_own_champion_and_logged_as_its_rows(
    project: Path, tenant_file: Path, logdb: str
) -> None:
    own = f"{get_settings().model_name}.batchco"
    result = batch_score(str(tenant_file), output_dir="out", tenant="batchco")
    assert (result.model_name, result.model_version) == (own, "2")
    assert result.batch_id.startswith("batchco-")
    assert result.logged == TENANT_ROWS
    assert tenant_rows(logdb, result.batch_id) == {("batchco", own, "2")}


def test_a_tenant_without_its_own_model_gets_the_shared_champion_in_batch(
    project: Path, tenant_file: Path, logdb: str
) -> None:
    shared = get_settings().model_name
    result = batch_score(str(tenant_file), output_dir="out", tenant="solo")
    assert result.model_name == shared
    assert result.logged == TENANT_ROWS  # its own batch id: no clash with batchco's rows
    assert tenant_rows(logdb, result.batch_id) == {("solo", shared, result.model_version)}


def test_a_malformed_tenant_id_is_refused_by_name(project: Path, tenant_file: Path) -> None:
    with pytest.raises(UserError, match="tenant id 'Not A Tenant'"):
        batch_score(str(tenant_file), output_dir="out", tenant="Not A Tenant")
