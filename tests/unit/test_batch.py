"""Batch scoring: chunked equals one-shot, bad rows set aside with reasons, re-runs idempotent."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common import batch_job
from common.errors import UserError
from common.params import DataParams, Params
from common.registry import served
from common.store import sources
from models import batch
from models.data import model_frame
from models.generate import generate
from models.predict import Scorer
from tests.unit.test_predict import as_bundle, fitted, save_model_dir


@pytest.fixture(scope="module")
def model_dir(
    data_params: DataParams, params: Params, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    df = generate(2_000, seed=3)
    pipeline = fitted(df, data_params, params)
    return save_model_dir(pipeline, data_params, df, tmp_path_factory.mktemp("m") / "model")


@pytest.fixture(scope="module")
def scorer(model_dir: Path) -> Scorer:
    return Scorer.load(model_dir, prefer_onnx=True)


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    return generate(1_234, seed=11)


@pytest.fixture
def parquet(rows: pd.DataFrame, tmp_path: Path) -> Path:
    path = tmp_path / "in.parquet"
    rows.to_parquet(path)
    return path


class ListSink:
    """A LogSink that keeps what it was given; `committed` only after commit()."""

    def __init__(self) -> None:
        self.chunks: list[pa.Table] = []
        self.committed: list[pa.Table] = []

    def write(self, rows: pa.Table) -> None:
        self.chunks.append(rows)

    def commit(self) -> int:
        self.committed = self.chunks
        return sum(t.num_rows for t in self.chunks)


def run(
    scorer: Scorer,
    source: Path,
    out: Path,
    *,
    chunk_rows: int = 100,
    batch_id: str = "b1",
    sink: batch.LogSink | None = None,
) -> batch.BatchResult:
    inp = sources.open_input(str(source))
    read = batch.columns_to_read(inp.source, inp.columns, scorer.features, ["customer_id"])
    return batch.score_batch(
        sources.read_chunks(inp, read, chunk_rows),
        scorer,
        source=inp.source,
        columns=inp.columns,
        model_name="m",
        model_version="7",
        batch_id=batch_id,
        output_dir=out,
        keep=["customer_id"],
        sink=sink,
    )


def test_chunked_scoring_equals_one_shot_scoring(
    scorer: Scorer, rows: pd.DataFrame, parquet: Path, data_params: DataParams, tmp_path: Path
) -> None:
    result = run(scorer, parquet, tmp_path / "out", chunk_rows=100)
    got = pd.read_parquet(result.predictions_path)
    frame = model_frame(rows, data_params)
    expected = scorer.proba_columns({c: frame[c].to_numpy() for c in frame.columns})
    assert (result.rows, result.scored, result.rejected) == (len(rows), len(rows), 0)
    assert got["row_number"].tolist() == list(range(len(rows)))
    assert got["customer_id"].tolist() == rows["customer_id"].tolist()
    np.testing.assert_allclose(got[["proba_0", "proba_1"]].to_numpy(), expected, atol=1e-7)
    assert set(got["model_version"]) == {"7"}
    assert set(got["batch_id"]) == {"b1"}


def test_column_path_matches_the_record_path(scorer: Scorer, rows: pd.DataFrame) -> None:
    head = rows.head(50)
    records = [
        {str(k): None if pd.isna(v) else v for k, v in r.items()}
        for r in head[[n for n, _ in scorer.features]].to_dict(orient="records")
    ]
    checked = batch.check_chunk(
        pa.RecordBatch.from_pandas(head), scorer.features, scorer.categories
    )
    np.testing.assert_allclose(
        scorer.proba_columns(checked.columns), scorer.proba(records), atol=1e-7
    )


def test_rejects_bad_rows_with_column_and_rule(
    scorer: Scorer, rows: pd.DataFrame, tmp_path: Path
) -> None:
    df = rows.head(300).astype({"age": object, "region": object})
    df.loc[5, "age"] = "forty"
    df.loc[7, "region"] = "atlantis"
    df.loc[9, "monthly_charges"] = np.inf
    df.loc[11, ["age", "region"]] = [None, ""]  # missing values are allowed
    csv = tmp_path / "in.csv"
    df.to_csv(csv, index=False)
    result = run(scorer, csv, tmp_path / "out", chunk_rows=64)
    rejects = pd.read_parquet(result.rejects_path)
    assert rejects["row_number"].tolist() == [5, 7, 9]
    assert rejects["reason"].tolist() == [
        "age: not a number 'forty'",
        "region: unknown category 'atlantis'",
        "monthly_charges: not a number 'inf'",  # CSV text: only plain decimal numbers
    ]
    assert rejects.loc[0, "customer_id"] == df.loc[5, "customer_id"]
    scored = pd.read_parquet(result.predictions_path)
    assert len(scored) == 297
    assert 11 in set(scored["row_number"])
    assert (result.scored, result.rejected) == (297, 3)


def test_infinite_numbers_in_parquet_are_rejected(
    scorer: Scorer, rows: pd.DataFrame, tmp_path: Path
) -> None:
    df = rows.head(50).copy()
    df.loc[3, "monthly_charges"] = -np.inf
    src = tmp_path / "in.parquet"
    df.to_parquet(src)
    result = run(scorer, src, tmp_path / "out")
    rejects = pd.read_parquet(result.rejects_path)
    assert rejects[["row_number", "reason"]].values.tolist() == [[3, "monthly_charges: not finite"]]


def test_missing_column_refused_before_anything_is_written(
    scorer: Scorer, rows: pd.DataFrame, tmp_path: Path
) -> None:
    src = tmp_path / "in.parquet"
    rows.drop(columns=["age", "region"]).to_parquet(src)
    sink = ListSink()
    with pytest.raises(UserError, match=r"in\.parquet: missing column\(s\) \['age', 'region'\]"):
        run(scorer, src, tmp_path / "out", sink=sink)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))
    assert sink.chunks == []


def test_failure_mid_batch_leaves_no_files(scorer: Scorer, parquet: Path, tmp_path: Path) -> None:
    class Failing(ListSink):
        def commit(self) -> int:
            raise RuntimeError("database went away")

    with pytest.raises(RuntimeError, match="went away"):
        run(scorer, parquet, tmp_path / "out", sink=Failing())
    assert list((tmp_path / "out").rglob("*")) == []


def test_non_existent_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope\.parquet: no such file"):
        sources.open_input(str(tmp_path / "nope.parquet"))


def test_a_table_source_needs_a_name_and_database_url() -> None:
    with pytest.raises(UserError, match=r"table:: no table name; use table:<name>"):
        sources.open_input("table:", database_url="postgresql://nowhere/db")
    with pytest.raises(UserError, match=r"table:incoming: .* DATABASE_URL, which is not set"):
        sources.open_input("table:incoming")


def test_an_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    url = f"postgresql://u@/db?host={tmp_path}"  # a socket directory nobody listens in
    with pytest.raises(UserError, match=r"table:incoming: cannot connect to the database in DATA"):
        sources.open_input("table:incoming", database_url=url)


def test_rerun_with_same_batch_id_gives_identical_ids_and_output(
    scorer: Scorer, parquet: Path, tmp_path: Path
) -> None:
    first, second = ListSink(), ListSink()
    a = run(scorer, parquet, tmp_path / "a", batch_id="again", sink=first)
    b = run(scorer, parquet, tmp_path / "b", batch_id="again", chunk_rows=333, sink=second)
    pa_, pb = pq.read_table(a.predictions_path), pq.read_table(b.predictions_path)
    assert pa_.equals(pb)
    ids = pa_.column("request_id").to_pylist()
    assert ids[3] == str(uuid.uuid5(batch.NAMESPACE, "again:3"))
    logged = pa.concat_tables(second.committed).column("request_id").to_pylist()
    assert logged == ids


def test_request_ids_are_uuid5_of_batch_and_row() -> None:
    got = batch.request_ids("x-1", 998, 5).to_pylist()
    assert got == [str(uuid.uuid5(batch.NAMESPACE, f"x-1:{i}")) for i in range(998, 1003)]


def test_chunks_never_exceed_chunk_rows(rows: pd.DataFrame, tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    rows.to_csv(src, index=False)
    inp = sources.open_input(str(src))
    sizes = [b.num_rows for b in sources.read_chunks(inp, ["age", "region"], 100)]
    assert max(sizes) <= 100
    assert sum(sizes) == len(rows)


def test_log_rows_carry_inputs_and_probabilities_as_json(
    scorer: Scorer, rows: pd.DataFrame, parquet: Path, tmp_path: Path
) -> None:
    sink = ListSink()
    run(scorer, parquet, tmp_path / "out", sink=sink)
    log = pa.concat_tables(sink.committed).to_pandas()
    assert len(log) == len(rows)

    first = json.loads(log.loc[0, "inputs"])
    assert set(first) == {n for n, _ in scorer.features}
    probs = json.loads(log.loc[0, "probabilities"])
    assert set(probs) == set(scorer.classes)
    assert abs(sum(probs.values()) - 1) < 1e-6
    assert log.loc[0, "predicted"] in scorer.classes


def test_marks_values_outside_the_declared_range_as_rejects() -> None:
    chunk = pa.RecordBatch.from_pydict(
        {"age": [41.0, 150.0, None, 17.0], "tenure": [1.0, 2.0, 3.0, 4.0]}
    )
    checked = batch.check_chunk(
        chunk, [("age", "numeric"), ("tenure", "numeric")], {}, {"age": (18.0, 120.0)}
    )
    assert checked.bad.tolist() == [False, True, False, True]
    assert checked.reasons == [
        "age: outside the trained range [18.0, 120.0] 150.0",
        "age: outside the trained range [18.0, 120.0] 17.0",
    ]
    unbounded = batch.check_chunk(chunk, [("age", "numeric"), ("tenure", "numeric")], {})
    assert not unbounded.bad.any()


def test_a_batch_job_scores_a_file_with_a_served_version_without_a_log(
    model_dir: Path, rows: pd.DataFrame, parquet: Path, tmp_path: Path
) -> None:
    model = served.from_dir(as_bundle(model_dir), "churn-classifier")
    seen: list[tuple[int, int]] = []

    result = batch_job.run(
        sources.open_input(str(parquet)),
        model,
        "job-1",
        tmp_path / "out",
        chunk_rows=500,
        id_column="customer_id",
        database_url=None,
        progress=lambda read, rejected: seen.append((read, rejected)),
    )

    assert (result.rows, result.scored, result.logged) == (len(rows), len(rows), None)
    assert (result.model_name, result.model_version) == ("churn-classifier", "bundled")
    assert seen == [(500, 0), (1000, 0), (len(rows), 0)]
    got = pd.read_parquet(result.predictions_path)
    assert got["customer_id"].tolist() == rows["customer_id"].tolist()
    assert result.predictions_path == tmp_path / "out" / "job-1" / batch.PREDICTIONS_FILE
