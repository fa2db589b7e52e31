"""Only sealed versions load, against the real MLflow server (PostgreSQL, S3 artifacts).

`churn-trust` v1 is the pipeline's champion as the register stage left it (sealed); v2 is a
sealed copy of it whose contract file was rewritten in the bucket after registration; v3 is
the same pipeline logged with `serialization_format="cloudpickle"`, sealed and tagged like
any other: the files are the registered ones, but the format is refused. Every loader refuses
v2 and v3 (fetch and the scorer, batch scoring, the register gate, the promote flow's
scoring, the environment copy), and a live predictor whose champion moves to them keeps
serving v1 and shows why in /model.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import mlflow
import mlflow.sklearn
import pandas as pd
import pytest
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from common import registry
from common.localpg import LocalPostgres
from common.params import load_params
from common.registry import environments, served, trust
from common.registry import tags as tag
from common.settings import Settings
from flows import batch_score
from models import register
from models.predict import SKOPS_TRUSTED, load_pipeline
from models.promote import _score_version
from tests.integration.serving import (
    api_key,
    auth,
    predictor_database,
    register_copies,
    serve_predictor,
)
from tests.servers import MLFLOW_BUCKET, HttpServer, S3Endpoint, throwaway_cluster
from tests.workspace import Workspace

NAME = "churn-trust"
TAMPERED_FILE = "extra_files/data_contract.json"
RECORD: dict[str, Any] = {
    "tenure_months": 12,
    "monthly_charges": 70.5,
    "total_charges": 846.0,
    "support_tickets_90d": 2,
    "avg_daily_usage_min": 60.0,
    "days_since_last_login": 3,
    "num_products": 2,
    "age": 41,
    "late_payments_12m": 0,
    "satisfaction_score": None,
    "contract_type": "month_to_month",
    "payment_method": "electronic_check",
    "region": "north",
    "plan_tier": "standard",
}


@dataclass(frozen=True)
class Versions:
    client: MlflowClient
    settings: Settings
    sealed: str
    tampered: str
    cloudpickle: str


def _copy_of_champion(client: MlflowClient, settings: Settings, run_name: str) -> str:
    """The champion's files logged again in a run of their own, registered with the
    champion's tags (its manifest's SHA-256): a properly sealed copy; its version."""
    champion = client.get_model_version_by_alias("churn-classifier", "champion")
    with tempfile.TemporaryDirectory() as tmp:
        files = Path(tmp) / "model"
        mlflow.artifacts.download_artifacts(
            f"models:/churn-classifier/{champion.version}", dst_path=str(files)
        )
        run_id, uri = registry.log_run(
            settings,
            "trust-tests",
            run_name,
            tags={},
            metrics={},
            artifacts=files,
            artifact_path="model",
        )
    mv = client.create_model_version(NAME, source=uri, run_id=run_id, tags=champion.tags)
    return str(mv.version)


def _cloudpickled(client: MlflowClient, settings: Settings) -> str:
    """The champion's pipeline logged with cloudpickle, sealed and tagged as train/register
    would: only its format is wrong."""
    champion = client.get_model_version_by_alias("churn-classifier", "champion")
    with tempfile.TemporaryDirectory() as tmp:
        files = Path(tmp) / "model"
        mlflow.artifacts.download_artifacts(
            f"models:/churn-classifier/{champion.version}", dst_path=str(files)
        )
        meta = Model.load(str(files))
        example = pd.read_json(files / "input_example.json", orient="split")
        mlflow.set_experiment("trust-tests")
        with mlflow.start_run(run_name="cloudpickle"):
            info = mlflow.sklearn.log_model(
                load_pipeline(files),
                name="model",
                signature=meta.signature,
                input_example=example,
                pip_requirements=["scikit-learn"],
                serialization_format="cloudpickle",
                skops_trusted_types=SKOPS_TRUSTED,
            )
    sealed = trust.seal(client, str(info.model_id))
    tags = {**champion.tags, tag.MANIFEST_SHA256: sealed}
    mv = client.create_model_version(
        NAME, source=info.model_uri, run_id=info.run_id, tags=tags, model_id=info.model_id
    )
    return str(mv.version)


@pytest.fixture(scope="module")
def versions(
    mlflow_server: HttpServer,
    pipeline: Workspace,
    s3: S3Endpoint,
    tmp_path_factory: pytest.TempPathFactory,
) -> Versions:
    home = tmp_path_factory.mktemp("trust")
    settings = Settings(
        MLOPS_HOME=home / ".mlops", MLFLOW_TRACKING_URI=mlflow_server.url, MODEL_NAME=NAME
    )
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**s3.creds, "MLFLOW_S3_ENDPOINT_URL": s3.url}.items():
            mp.setenv(key, value)
        client = register_copies(mlflow_server.url, NAME, versions=1)
        registry.connect(settings)
        tampered = _copy_of_champion(client, settings, "tampered copy")
        run_id = client.get_model_version(NAME, tampered).run_id
        assert run_id is not None
        (key,) = [
            k
            for k in s3.keys(MLFLOW_BUCKET)
            if run_id in k and k.endswith(f"model/{TAMPERED_FILE}")
        ]
        s3.client().put_object(Bucket=MLFLOW_BUCKET, Key=key, Body=b'{"features": {}}\n')
        cloudpickle = _cloudpickled(client, settings)
    return Versions(client, settings, "1", tampered, cloudpickle)


def _cache(tmp_path: Path) -> Path:
    return tmp_path / "model-cache"


def test_a_version_registered_by_the_pipeline_is_sealed_and_loads(
    versions: Versions, tmp_path: Path
) -> None:
    mv = versions.client.get_model_version(NAME, versions.sealed)
    assert len(mv.tags[tag.MANIFEST_SHA256]) == 64
    model = served.by_version(versions.client, NAME, versions.sealed, _cache(tmp_path))
    assert model.scorer.backend == "onnx"
    assert (model.path / "manifest.json").is_file()


def test_refuses_a_version_whose_files_changed_after_registration(
    versions: Versions, tmp_path: Path
) -> None:
    with pytest.raises(trust.UntrustedModelError) as caught:
        served.by_version(versions.client, NAME, versions.tampered, _cache(tmp_path))
    assert str(caught.value) == (
        f"models:/{NAME}/{versions.tampered}: file {TAMPERED_FILE} differs from the one "
        "registered (sha256 mismatch)"
    )
    assert not (_cache(tmp_path) / NAME / versions.tampered).exists()  # not kept for later


def test_refuses_a_version_logged_with_cloudpickle(versions: Versions, tmp_path: Path) -> None:
    model = served.by_version(versions.client, NAME, versions.cloudpickle, _cache(tmp_path))
    with pytest.raises(trust.UntrustedModelError) as caught:
        _ = model.scorer
    assert str(caught.value).startswith(
        f"models:/{NAME}/{versions.cloudpickle}: the MLmodel asks to load the pipeline with "
        "'cloudpickle'; only 'skops' is loaded here"
    )
    with pytest.raises(trust.UntrustedModelError, match="'cloudpickle'"):
        _ = model.pipeline


@pytest.mark.parametrize("which", ["tampered", "cloudpickle"])
def test_batch_scoring_refuses_an_untrusted_champion(versions: Versions, which: str) -> None:
    version = getattr(versions, which)
    versions.client.set_registered_model_alias(NAME, "champion", version)
    try:
        with pytest.raises(trust.UntrustedModelError):
            _ = batch_score.fetch_champion.fn(versions.settings).scorer
    finally:
        versions.client.set_registered_model_alias(NAME, "champion", versions.sealed)


@pytest.mark.parametrize("which", ["tampered", "cloudpickle"])
def test_the_gate_and_the_promote_flow_refuse_an_untrusted_champion(
    versions: Versions, pipeline: Workspace, tmp_path: Path, which: str
) -> None:
    version = getattr(versions, which)
    params = load_params(pipeline.path / "params.yaml")
    holdout = pd.read_parquet(pipeline.path / "data" / "prepared" / "holdout.parquet")
    versions.client.set_registered_model_alias(NAME, "champion", version)
    try:
        champion, metrics, why = register._champion_metrics(
            versions.client, NAME, holdout, params, _cache(tmp_path)
        )
    finally:
        versions.client.set_registered_model_alias(NAME, "champion", versions.sealed)
    assert (champion, metrics) == (version, None)
    assert why is not None
    assert why.startswith(f"champion v{version} was refused: ")
    mv = versions.client.get_model_version(NAME, version)
    with pytest.raises(trust.UntrustedModelError):
        _score_version(mv, _cache(tmp_path), holdout, params.data)


def test_an_environment_copy_refuses_a_tampered_version_and_carries_the_seal(
    versions: Versions,
) -> None:
    def step(version: str, target: str) -> environments.Step:
        return environments.Step(
            source_env="dev",
            target_env="staging",
            source_model=NAME,
            source_version=version,
            target_model=target,
            tenant=None,
        )

    with pytest.raises(trust.UntrustedModelError, match=TAMPERED_FILE):
        environments.copy_version(
            versions.client, versions.settings, step(versions.tampered, f"{NAME}-bad"), extra={}
        )
    copied = environments.copy_version(
        versions.client, versions.settings, step(versions.sealed, f"{NAME}-staging"), extra={}
    )
    source = versions.client.get_model_version(NAME, versions.sealed)
    assert copied.tags[tag.MANIFEST_SHA256] == source.tags[tag.MANIFEST_SHA256]
    with tempfile.TemporaryDirectory() as tmp:
        served.by_version(versions.client, f"{NAME}-staging", str(copied.version), Path(tmp))


@pytest.fixture(scope="module")
def logdb() -> Iterator[LocalPostgres]:
    with throwaway_cluster("trustlog", "predictions") as pg:
        yield pg


@pytest.fixture(scope="module")
def predictor(
    versions: Versions,
    mlflow_server: HttpServer,
    logdb: LocalPostgres,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    home = tmp_path_factory.mktemp("trust-predictor")
    _, as_predictor = predictor_database(logdb)
    env = {
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "MODEL_NAME": NAME,
        "MODEL_POLL_SECONDS": "1",
        "DATABASE_URL": as_predictor,
    }
    with serve_predictor(home, env) as url:
        yield url


def test_the_predictor_keeps_serving_its_model_when_the_champion_moves_to_an_untrusted_one(
    predictor: str, versions: Versions, logdb: LocalPostgres
) -> None:
    headers = auth(api_key(logdb.url("predictions")))
    before = httpx.get(f"{predictor}/model/", headers=headers, follow_redirects=True).json()
    assert before["model_version"] == versions.sealed
    for bad in (versions.tampered, versions.cloudpickle):
        versions.client.set_registered_model_alias(NAME, "champion", bad)
        uri = f"models:/{NAME}/{bad}"
        deadline = time.monotonic() + 30
        info: dict[str, Any] = {}
        while time.monotonic() < deadline:
            info = httpx.get(f"{predictor}/model/", headers=headers, follow_redirects=True).json()
            refused = info.get("refused")
            if isinstance(refused, dict) and uri in refused:
                break
            time.sleep(0.5)
        assert info["model_version"] == versions.sealed
        assert isinstance(info["refused"], dict)
        assert uri in info["refused"], info
        assert info["registry"]["reachable"] is True
        answer = httpx.post(
            f"{predictor}/predict",
            json={"records": RECORD},
            headers=headers,
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"][0]["model_version"] == versions.sealed
    # the refusals show on /metrics too (the UntrustedModelRefused alert reads it)
    metrics = httpx.get(f"{predictor}/metrics", timeout=10).text.splitlines()
    (refused_line,) = [m for m in metrics if m.startswith("predictor_refused_model_versions ")]
    assert float(refused_line.split()[1]) >= 1
    versions.client.set_registered_model_alias(NAME, "champion", versions.sealed)
