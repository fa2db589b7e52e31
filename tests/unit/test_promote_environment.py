"""promote_environment on an embedded registry under Prefect's test harness: what may move
where, tenants' models, a signed rejection; and which names mlops-auth protects."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import mlflow
import pandas as pd
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
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
from sklearn.dummy import DummyClassifier

from common import approvals, registry
from common.errors import UserError
from common.registry import access, environments, promotion, trust
from common.registry import tags as tag
from common.registry.server_auth import environment_of
from common.settings import get_settings
from flows.promote import Outcome, promote_environment
from tests.servers import PREFECT_STARTUP_TIMEOUT
from tests.workspace import ROOT

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module", autouse=True)
def harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=PREFECT_STARTUP_TIMEOUT):
        yield


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MlflowClient]:
    """An empty embedded registry, params.yaml (approval timeout 30 s), alice a reviewer."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / ".mlops"))
    monkeypatch.setenv("MLOPS_REVIEWERS_FILE", str(tmp_path / "reviewers"))
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["promote"]["approval_timeout_seconds"] = 30
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    key = Ed25519PrivateKey.generate()
    (tmp_path / "alice_ed25519").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    approvals.add_reviewer(tmp_path / "reviewers", "alice", public.decode())
    get_settings.cache_clear()
    yield registry.connect(get_settings())
    get_settings.cache_clear()


def _version(client: MlflowClient, name: str, *, gate: str = "promoted") -> str:
    """A tiny logged model registered as `name`, its gate passed (or not), champion if passed."""
    settings = get_settings()
    mlflow.set_experiment(settings.mlflow_experiment_name)
    frame = pd.DataFrame({"x": [0.0, 1.0]})
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            DummyClassifier().fit(frame, [0, 1]),
            name="model",
            registered_model_name=name,
            pip_requirements=["scikit-learn"],  # no inference: a subprocess, seconds
        )
    version = str(info.registered_model_version)
    registry.set_tags(
        client,
        name,
        version,
        {
            tag.GATE_DECISION: gate,
            tag.METRICS: '{"roc_auc": 0.8}',
            tag.MANIFEST_SHA256: trust.seal(client, str(info.model_id)),  # as train seals it
        },
    )
    if gate == "promoted":
        promotion.move_champion(client, name, version, by="register stage", reason="gate")
    return version


def test_only_staging_and_prod_are_targets_in_order(store: MlflowClient) -> None:
    for target in ("dev", "qa"):
        with pytest.raises(UserError, match="promote to one of staging, prod"):
            environments.plan(store, get_settings(), target)


def test_prod_needs_a_staging_champion(store: MlflowClient) -> None:
    _version(store, "churn-classifier")

    with pytest.raises(UserError, match="churn-classifier-staging has no champion"):
        environments.plan(store, get_settings(), "prod")


def test_staging_takes_devs_champion_not_a_version_the_gate_rejected(store: MlflowClient) -> None:
    _version(store, "churn-classifier")
    rejected = _version(store, "churn-classifier", gate="rejected")

    step = environments.plan(store, get_settings(), "staging")

    assert (step.source_version, step.target_model) == ("1", "churn-classifier-staging")
    with pytest.raises(UserError, match=f"v{rejected} did not pass the gate"):
        environments.plan(store, get_settings(), "staging", version=rejected)


def test_a_tenants_own_model_moves_to_the_tenants_model_of_the_next_environment(
    store: MlflowClient,
) -> None:
    _version(store, "churn-classifier.acme")

    outcome = promote_environment(to="staging", tenant="acme")

    assert outcome == Outcome(
        True,
        "churn-classifier.acme v1 (dev) -> churn-classifier-staging.acme (staging): promoted "
        "as churn-classifier-staging.acme v1 (champion)",
    )
    mv = store.get_model_version_by_alias("churn-classifier-staging.acme", registry.CHAMPION)
    assert mv.tags[tag.TENANT] == "acme"
    assert mv.tags[tag.ENV_SOURCE_MODEL] == "churn-classifier.acme"
    assert json.loads(mv.tags[tag.ENV_GATE_METRICS]) == {"roc_auc": 0.8}
    assert registry.version_by_alias(store, "churn-classifier-staging", "champion") is None


def test_promoting_the_same_version_again_reuses_its_copy(store: MlflowClient) -> None:
    _version(store, "churn-classifier")
    promote_environment(to="staging")

    promote_environment(to="staging")

    assert len(store.search_model_versions("name = 'churn-classifier-staging'")) == 1


def _paused_run(timeout: float = 30) -> UUID:
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


def test_a_signed_rejection_moves_nothing_to_prod(store: MlflowClient, tmp_path: Path) -> None:
    _version(store, "churn-classifier")
    promote_environment(to="staging")
    result: list[Outcome] = []
    thread = threading.Thread(
        target=lambda: result.append(promote_environment(to="prod")), daemon=True
    )
    thread.start()
    run_id = _paused_run()
    with get_client(sync_client=True) as client:
        raw = client.read_flow_run_input(flow_run_id=run_id, key=approvals.REQUEST_KEY)
    request = approvals.Request(**json.loads(raw))
    key = approvals.load_private_key(tmp_path / "alice_ed25519")
    later = datetime.now(UTC) + timedelta(minutes=5)
    answer = approvals.sign(key, request, "alice", approvals.REJECT, later)

    resume_flow_run(run_id, run_input=vars(answer))
    thread.join(60)

    assert len(result) == 1
    assert not result[0].moved
    assert result[0].message.endswith("not promoted: rejected by alice")
    assert registry.version_by_alias(store, "churn-classifier-prod", "champion") is None


@pytest.mark.parametrize(
    ("name", "env"),
    [
        ("churn-classifier", None),
        ("churn-classifier.acme", None),
        ("churn-classifier-staging", "staging"),
        ("churn-classifier-prod", "prod"),
        ("churn-classifier-prod.acme", "prod"),
        ("churn-classifier-production", None),
        ("other-prod", None),
    ],
)
def test_mlops_auth_knows_which_environment_a_model_belongs_to(name: str, env: str | None) -> None:
    assert environment_of(name, "churn-classifier") == env


def test_each_environment_has_its_own_promotion_identity() -> None:
    assert access.IDENTITY == {"dev": "flows", "staging": "flows-staging", "prod": "flows-prod"}
    for user in access.ENVIRONMENT_USERS:
        assert dict(user.grants) == {"experiment": "READ", "registered_model": "READ"}


def test_an_environments_identity_is_made_only_when_its_password_is_set() -> None:
    passwords = {
        access.FLOWS.password_env: "long-enough-pw",
        access.PREDICTOR.password_env: "long-enough-pw",
        access.FLOWS_PROD.password_env: "short",
    }
    with pytest.raises(UserError, match=access.FLOWS_PROD.password_env):
        access.ensure_service_users("http://127.0.0.1:9", ("admin", "x"), passwords)
