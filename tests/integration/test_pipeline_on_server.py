"""The real pipeline (`dvc repro`) against an MLflow server on PostgreSQL with S3 artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from common.lineage import file_md5
from tests.servers import MLFLOW_BUCKET, HttpServer, S3Endpoint, free_port
from tests.workspace import Workspace

MODEL = "churn-classifier"

LOAD_CHAMPION = """
import json
import mlflow
import pandas as pd
from common.params import load_params
from models.data import model_frame

params = load_params()
rows = pd.read_parquet("data/prepared/holdout.parquet").head(7)
model = mlflow.sklearn.load_model("models:/churn-classifier@champion")
print(json.dumps(model.predict_proba(model_frame(rows, params.data)).tolist()))
"""


@pytest.fixture
def client(mlflow_server: HttpServer) -> MlflowClient:
    return MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)


def test_champion_registered_with_lineage(pipeline: Workspace, client: MlflowClient) -> None:
    version = client.get_model_version_by_alias(MODEL, "champion")
    tags = version.tags
    head = pipeline.run("git", "rev-parse", "HEAD").stdout.strip()
    assert tags["git.commit"].removesuffix("-dirty") == head
    assert tags["dvc.train_md5"] == file_md5(pipeline.path / "data/prepared/train.parquet")
    assert tags["onnx.parity"] == "passed"
    assert tags["gate.decision"] == "promoted"  # the first version on a fresh server
    report = json.loads((pipeline.path / "reports/register.json").read_text())
    assert report["version"] == str(version.version)
    assert report["promoted"] is True


def test_artifacts_landed_in_bucket(pipeline: Workspace, s3: S3Endpoint) -> None:
    model_id = json.loads((pipeline.path / "reports/train.json").read_text())["model_id"]
    names = {Path(key).name for key in s3.keys(MLFLOW_BUCKET) if model_id in key}
    assert {"model.onnx", "reference.parquet", "MLmodel"} <= names


def test_champion_loads_in_fresh_process(pipeline: Workspace) -> None:
    # The workspace env has only MLFLOW_TRACKING_URI: artifacts come through the server.
    out = pipeline.python("-c", LOAD_CHAMPION).stdout
    proba = np.array(json.loads(out.strip().splitlines()[-1]))
    assert proba.shape == (7, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-9)


def test_train_with_unreachable_server_is_a_user_error(pipeline: Workspace) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    ws = Workspace(pipeline.path, {"MLFLOW_TRACKING_URI": uri})
    proc = ws.python("-m", "models.train", check=False)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "MLFLOW_TRACKING_URI" in errors[0]
    assert uri in errors[0]
    assert "\n\n" not in proc.stderr.strip()
