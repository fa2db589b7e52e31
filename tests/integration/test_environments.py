"""Promotion across environments on a real `mlflow server --app-name mlops-auth` and a real
Prefect API: dev -> staging -> prod, prod only with a registered reviewer's signed approval.

One server for the module (SQLite store, artifacts in a local folder the test can delete),
its users made by `common.registry.access` as `mlflow-init` makes them: `flows` (dev),
`flows-staging`, `flows-prod`. Each step runs as its environment's identity.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import mlflow
import pandas as pd
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.flow_runs import resume_flow_run
from prefect.testing.utilities import prefect_test_harness
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from common import approvals, registry
from common.cli import main as mlops
from common.errors import UserError
from common.registry import access, environments, promotion, served, trust
from common.registry import tags as tag
from common.settings import get_settings
from flows.promote import main as promote_cli
from tests.servers import PREFECT_STARTUP_TIMEOUT, HttpServer, Server, clean_env, free_port, http_ok
from tests.workspace import ROOT

pytestmark = pytest.mark.integration

DEV, STAGING, PROD = "churn-classifier", "churn-classifier-staging", "churn-classifier-prod"
ADMIN = ("admin", "admin-password-1")
PASSWORDS = {
    access.FLOWS.password_env: "flows-password-1",
    access.PREDICTOR.password_env: "predictor-password-1",
    access.FLOWS_STAGING.password_env: "staging-password-1",
    access.FLOWS_PROD.password_env: "prod-password-1",
}
USERS = {
    "flows": PASSWORDS[access.FLOWS.password_env],
    "flows-staging": PASSWORDS[access.FLOWS_STAGING.password_env],
    "flows-prod": PASSWORDS[access.FLOWS_PROD.password_env],
}
TIMEOUT = 45
"""The prod approval's timeout (params.yaml's promote.approval_timeout_seconds) here."""


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=PREFECT_STARTUP_TIMEOUT):
        yield


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HttpServer, Path]]:
    """`mlflow server --app-name mlops-auth` with its service users; (server, artifact root)."""
    root = tmp_path_factory.mktemp("mlflow-envs")
    (root / "basic_auth.ini").write_text(access.auth_config(f"sqlite:///{root / 'auth.db'}"))
    artifacts = root / "artifacts"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        "mlflow",
        "server",
        *("--app-name", "mlops-auth"),
        *("--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"),
        *("--artifacts-destination", artifacts.as_uri(), "--serve-artifacts"),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    env = clean_env(
        MLFLOW_AUTH_CONFIG_PATH=str(root / "basic_auth.ini"),
        MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN[1],
        MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret-key",
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    log = root / "mlflow.log"
    proc = Server("mlflow server", cmd, log_path=log, healthy=http_ok(f"{url}/health"), env=env)
    with proc.start():
        access.ensure_service_users(url, ADMIN, PASSWORDS)
        yield HttpServer(url, log), artifacts


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """params.yaml with the prod approval's timeout, and the reviewers' keys (alice, bob)."""
    path = tmp_path_factory.mktemp("project")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["promote"]["approval_timeout_seconds"] = TIMEOUT
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for name in ("alice", "bob", "mallory"):
        key = Ed25519PrivateKey.generate()
        (path / f"{name}_ed25519").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        if name != "mallory":
            approvals.add_reviewer(path / "reviewers", name, public.decode())
    return path


@pytest.fixture
def as_user(
    server: tuple[HttpServer, Path],
    project: Path,
    harness: None,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Any]:
    """`as_user(name)`: this process now talks to the server as `name`; returns a client."""
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server[0].url)
    monkeypatch.setenv("MLOPS_HOME", str(project / ".mlops"))
    monkeypatch.setenv("MLOPS_REVIEWERS_FILE", str(project / "reviewers"))

    def switch(name: str) -> MlflowClient:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", name)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", USERS[name])
        get_settings.cache_clear()
        return registry.connect(get_settings())

    yield switch
    get_settings.cache_clear()


def _dev_version(client: MlflowClient, *, gate: str = "promoted", champion: bool = True) -> str:
    """A small real model logged and registered in dev, as the register stage leaves it."""
    frame = pd.DataFrame({"tenure": [1.0, 5.0, 30.0, 60.0], "charges": [80.0, 70.0, 40.0, 20.0]})
    labels = [1, 1, 0, 0]
    model = Pipeline([("scale", StandardScaler()), ("lr", LogisticRegression())]).fit(frame, labels)
    settings = get_settings()
    mlflow.set_experiment(settings.mlflow_experiment_name)
    with mlflow.start_run() as run:
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            input_example=frame.head(2),
            signature=infer_signature(frame, model.predict_proba(frame)[:, 1]),
            registered_model_name=DEV,
            pip_requirements=["scikit-learn"],  # no inference: a subprocess, seconds
        )
    version = str(info.registered_model_version)
    registry.set_tags(
        client,
        DEV,
        version,
        {
            tag.GIT_COMMIT: "abc1234",
            tag.DVC_RAW_MD5: "0123456789abcdef",
            tag.METRICS: json.dumps({"roc_auc": 0.91, "log_loss": 0.31}),
            tag.ONNX_PARITY: "failed",
            tag.MLFLOW_RUN_ID: run.info.run_id,
            tag.GATE_DECISION: gate,
            tag.MANIFEST_SHA256: trust.seal(client, str(info.model_id)),  # as train seals it
        },
    )
    if champion:
        promotion.move_champion(client, DEV, version, by="register stage", reason="gate passed")
    return version


def _champion(client: MlflowClient, name: str) -> str | None:
    mv = registry.version_by_alias(client, name, registry.CHAMPION)
    return str(mv.version) if mv is not None else None


def _paused_run(after: float = 0, timeout: float = 60) -> UUID:
    paused = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
    )
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(flow_run_filter=paused)
            if runs:
                return runs[0].id
            time.sleep(0.5)
    raise AssertionError("no paused flow run appeared")


def _request(flow_run_id: UUID) -> approvals.Request:
    with get_client(sync_client=True) as client:
        raw = client.read_flow_run_input(flow_run_id=flow_run_id, key=approvals.REQUEST_KEY)
    return approvals.Request(**json.loads(raw))


def _key(project: Path, name: str) -> Ed25519PrivateKey:
    return approvals.load_private_key(project / f"{name}_ed25519")


@pytest.fixture
def staged(as_user: Any) -> str:
    """A dev champion promoted to staging (no approval: its gate passed); staging's version."""
    dev = as_user("flows")
    _dev_version(dev)
    as_user("flows-staging")
    promote_cli(["promote", "--to", "staging"])
    staging = as_user("flows-staging")
    version = _champion(staging, STAGING)
    assert version is not None
    return version


def test_promote_to_staging_needs_a_dev_version_the_gate_passed(as_user: Any) -> None:
    dev = as_user("flows")
    held_back = _dev_version(dev, gate="rejected", champion=False)
    as_user("flows-staging")

    with pytest.raises(UserError, match=rf"{DEV} v{held_back} did not pass the gate"):
        promote_cli(["promote", "--to", "staging", "--version", held_back])


def test_promote_to_prod_without_approval_changes_nothing_and_says_so(
    staged: str, as_user: Any, capsys: pytest.CaptureFixture[str], project: Path
) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["promote"]["approval_timeout_seconds"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    prod = as_user("flows-prod")
    before = _champion(prod, PROD)
    try:
        promote_cli(["promote", "--to", "prod"])
    finally:
        params["promote"]["approval_timeout_seconds"] = TIMEOUT
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    out = capsys.readouterr().out
    assert f"{STAGING} v{staged} (staging) -> {PROD} (prod): not promoted: no approval" in out
    assert _champion(prod, PROD) == before


def test_a_signed_approval_promotes_to_prod_after_refusing_forged_expired_and_unknown_ones(
    staged: str,
    as_user: Any,
    project: Path,
    server: tuple[HttpServer, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    dev = as_user("flows")
    dev_version = str(dev.get_model_version(STAGING, staged).tags[tag.ENV_SOURCE_VERSION])
    dev_experiment = dev.get_experiment_by_name(get_settings().mlflow_experiment_name)
    prod = as_user("flows-prod")
    before = _champion(prod, PROD)
    done: list[BaseException | None] = []

    def run() -> None:
        try:
            promote_cli(["promote", "--to", "prod"])
            done.append(None)
        except BaseException as exc:  # reported by the assertion below
            done.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    flow_run_id = _paused_run()
    request = _request(flow_run_id)
    assert (request.source_model, request.source_version, request.target_env) == (
        STAGING,
        staged,
        "prod",
    )
    later = datetime.now(UTC) + timedelta(minutes=10)
    refused = [
        approvals.sign(_key(project, "bob"), request, "alice", approvals.APPROVE, later),
        approvals.sign(_key(project, "mallory"), request, "mallory", approvals.APPROVE, later),
        approvals.sign(
            _key(project, "alice"),
            request,
            "alice",
            approvals.APPROVE,
            datetime.now(UTC) - timedelta(seconds=1),
        ),
    ]
    for answer in refused:
        resume_flow_run(flow_run_id, run_input=approvals_dict(answer))
        assert _paused_run() == flow_run_id  # refused: waiting again
        assert _champion(prod, PROD) == before

    mlops(["approve", str(flow_run_id), "--key", str(project / "alice_ed25519")])
    thread.join(TIMEOUT + 30)

    assert done == [None]
    assert f"{PROD} (prod): promoted as {PROD} v" in capsys.readouterr().out
    version = _champion(prod, PROD)
    assert version is not None
    assert version != before
    tags = dict(prod.get_model_version(PROD, version).tags)
    assert tags[tag.ENV_SOURCE] == "staging"
    assert (tags[tag.ENV_SOURCE_MODEL], tags[tag.ENV_SOURCE_VERSION]) == (STAGING, staged)
    assert [step["env"] for step in json.loads(tags[tag.ENV_LINEAGE])] == ["staging", "dev"]
    assert json.loads(tags[tag.ENV_LINEAGE])[1] == {
        "env": "dev",
        "model": DEV,
        "version": dev_version,
    }
    assert tags[tag.APPROVAL_REVIEWER] == "alice"
    assert tags[tag.APPROVAL_FLOW_RUN_ID] == str(flow_run_id)
    assert json.loads(tags[tag.ENV_GATE_METRICS]) == {"roc_auc": 0.91, "log_loss": 0.31}
    assert (tags[tag.GIT_COMMIT], tags[tag.DVC_RAW_MD5]) == ("abc1234", "0123456789abcdef")
    assert tags[tag.alias_tag(registry.CHAMPION, tag.ALIAS_SET_BY)].startswith("alice (signed")
    evidence = json.loads(tags[promotion.EVIDENCE])
    assert evidence["approval"]["reviewer"] == "alice"
    assert evidence["source"] == {"env": "staging", "model": STAGING, "version": staged}

    # the copy, not a reference: dev's version and its files gone, prod still loads
    dev = as_user("flows")
    dev.delete_model_version(DEV, dev_version)
    shutil.rmtree(server[1] / str(dev_experiment.experiment_id))
    prod = as_user("flows-prod")
    model = served.by_version(prod, PROD, version, project / "empty-cache")
    scored = model.scorer.predict([{"tenure": 2.0, "charges": 75.0}, {"tenure": 50, "charges": 25}])
    assert [str(s.label) for s in scored] == ["1", "0"]


def approvals_dict(answer: approvals.Answer) -> dict[str, str]:
    return {
        "reviewer": answer.reviewer,
        "decision": answer.decision,
        "expires": answer.expires,
        "signature": answer.signature,
    }


def test_the_dev_credential_cannot_move_a_prod_alias_or_add_a_prod_version(
    staged: str, as_user: Any, server: tuple[HttpServer, Path]
) -> None:
    dev = as_user("flows")
    version = _dev_version(dev)
    prod = as_user("flows-prod")
    step = environments.plan(prod, get_settings(), "prod")
    environments.promote(
        prod, get_settings(), step, by="test setup", reason="a prod champion to defend"
    )
    target = str(_champion(prod, PROD))

    for who in ("flows", "flows-staging"):
        client = as_user(who)
        answer = httpx.post(
            f"{server[0].url}/api/2.0/mlflow/registered-models/alias",
            auth=(who, USERS[who]),
            json={"name": PROD, "alias": registry.CHAMPION, "version": target},
            timeout=30,
        )
        assert answer.status_code == 403
        assert answer.text.startswith("Permission denied")
        with pytest.raises(MlflowException, match="Permission denied"):
            client.delete_registered_model_alias(PROD, registry.CHAMPION)
        with pytest.raises(MlflowException, match="Permission denied"):
            client.set_registered_model_alias(PROD, registry.CHALLENGER, target)
        with pytest.raises(MlflowException, match="Permission denied"):
            client.create_model_version(PROD, source=f"models:/{DEV}/{version}")
        with pytest.raises(MlflowException, match="Permission denied"):
            client.set_model_version_tag(PROD, target, tag.APPROVAL_REVIEWER, "mallory")
    prod = as_user("flows-prod")
    assert prod.get_model_version(PROD, target).tags.get(tag.APPROVAL_REVIEWER) != "mallory"
