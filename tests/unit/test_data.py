"""Reading the raw table: a bad file is a one-line UserError naming it, never a traceback."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.errors import UserError
from common.params import DataParams
from models.data import MISSING_CATEGORY, model_frame, read_table
from models.generate import generate


def _parquet_bytes() -> bytes:
    buf = io.BytesIO()
    pd.DataFrame({"a": [1, 2]}).to_parquet(buf)
    return buf.getvalue()


GARBAGE = np.random.default_rng(0).bytes(4096)
PNG = b"\x89PNG\r\n\x1a\n" + GARBAGE


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("customers.csv", b"", "the file is empty"),
        ("customers.parquet", b"", "the file is empty"),
        ("customers.parquet", GARBAGE, "not a readable Parquet file"),
        ("customers.parquet", b"customer_id,churned\nC1,0\n", "not a readable Parquet file"),
        ("customers.csv", GARBAGE, "not a readable CSV file"),
        ("customers.csv", PNG, "not a readable CSV file"),
        ("customers.csv", _parquet_bytes(), "not a readable CSV file"),
        ("customers.csv", gzip.compress(b"a,b\n1,2\n"), "not a readable CSV file"),
        ("customers.csv", b"\n\n\n", "not a readable CSV file"),
        ("customers.xlsx", b"PK\x03\x04" + GARBAGE, "unsupported file type '.xlsx'"),
        ("customers.json", b'[{"a": 1}]', "unsupported file type '.json'"),
    ],
    ids=[
        "empty-csv",
        "empty-parquet",
        "binary-named-parquet",
        "csv-named-parquet",
        "binary-named-csv",
        "png-named-csv",
        "parquet-named-csv",
        "gzip-named-csv",
        "blank-lines-csv",
        "xlsx",
        "json",
    ],
)
def test_rejects_an_unreadable_file_naming_its_path(
    name: str, content: bytes, says: str, tmp_path: Path
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        read_table(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert says in message
    assert "\n" not in message


def test_rejects_a_missing_file_naming_its_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "customers.csv"
    with pytest.raises(UserError, match="file not found") as err:
        read_table(path)
    assert str(path) in str(err.value)
    assert "data.path" in str(err.value)  # says where to fix it


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".CSV"])
def test_reads_csv_and_parquet_alike(suffix: str, tmp_path: Path) -> None:
    df = generate(200, seed=1)
    path = tmp_path / f"customers{suffix}"
    if suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_csv(path, index=False)
        df.loc[df["payment_method"].isna(), "payment_method"] = np.nan  # CSV has one null
    pd.testing.assert_frame_equal(read_table(path), df)


def test_model_frame_has_the_features_in_params_order(data_params: DataParams) -> None:
    df = generate(50, seed=2)
    frame = model_frame(df[list(reversed(df.columns))], data_params)
    assert list(frame.columns) == data_params.feature_names


def test_model_frame_normalises_missing_values(data_params: DataParams) -> None:
    df = generate(4, seed=3).astype({"region": object, "tenure_months": object})
    df.loc[0, "region"] = None
    df.loc[1, "region"] = np.nan
    df.loc[2, "region"] = ""
    df.loc[3, "tenure_months"] = "n/a"
    frame = model_frame(df, data_params)
    assert frame["region"].tolist()[:3] == [MISSING_CATEGORY] * 3
    assert all(isinstance(v, str) for v in frame["region"])
    assert frame.dtypes[data_params.numeric].eq("float64").all()
    assert frame["tenure_months"].isna().tolist() == [False, False, False, True]
