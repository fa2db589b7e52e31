"""MLflow's basic-auth app as the project configures and meets it, without a server."""

from __future__ import annotations

import configparser
from pathlib import Path
from typing import Any

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, RESOURCE_DOES_NOT_EXIST

from common.errors import UserError
from common.registry import version_by_alias
from common.registry.access import (
    FLOWS,
    PREDICTOR,
    auth_config,
    ensure_service_users,
    main,
)

pytestmark = pytest.mark.unit


class _Registry:
    """An MLflow client that answers like a basic-auth server for one model name."""

    def __init__(self, model_exists: bool) -> None:
        self.model_exists = model_exists

    def get_model_version_by_alias(self, name: str, alias: str) -> Any:
        raise MlflowException("Permission denied", error_code=PERMISSION_DENIED)

    def get_registered_model(self, name: str) -> Any:
        if not self.model_exists:
            raise MlflowException(f"{name} not found", error_code=RESOURCE_DOES_NOT_EXIST)
        return object()


def test_an_alias_of_a_model_that_does_not_exist_yet_is_no_version() -> None:
    """basic-auth says 403 there, where an open server says 404 (the first registration)."""
    assert version_by_alias(_Registry(model_exists=False), "churn", "champion") is None  # type: ignore[arg-type]


def test_a_real_permission_denial_is_not_taken_for_a_missing_alias() -> None:
    with pytest.raises(MlflowException, match="Permission denied"):
        version_by_alias(_Registry(model_exists=True), "churn", "champion")  # type: ignore[arg-type]


def test_the_auth_config_grants_nothing_by_default_and_holds_no_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.server.auth.config import read_auth_config  # noqa: PLC0415

    path = tmp_path / "basic_auth.ini"
    path.write_text(auth_config("postgresql+psycopg://mlflow@db:5432/mlflow_auth"))
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "admin-password-1")
    config = read_auth_config()  # MLflow's own reader
    assert config.default_permission == "NO_PERMISSIONS"
    assert config.database_uri == "postgresql+psycopg://mlflow@db:5432/mlflow_auth"
    assert config.admin_password == "admin-password-1"  # from the environment, not the file
    assert config.auth_cache_ttl_seconds == 60  # a scrypt check per request is 0.5 s of CPU
    parsed = configparser.ConfigParser()
    parsed.read(path)
    assert "admin_password" not in parsed["mlflow"]


def test_only_the_flows_user_may_edit_and_the_predictor_only_read() -> None:
    assert dict(FLOWS.grants) == {"experiment": "EDIT", "registered_model": "EDIT"}
    assert dict(PREDICTOR.grants) == {"experiment": "READ", "registered_model": "READ"}


def test_short_or_missing_service_passwords_fail_before_any_request() -> None:
    passwords = {FLOWS.password_env: "long-enough-pw", PREDICTOR.password_env: "short"}
    with pytest.raises(UserError, match=PREDICTOR.password_env):
        ensure_service_users("http://127.0.0.1:9", ("admin", "x"), passwords)


def test_the_init_job_names_every_variable_it_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        FLOWS.password_env,
        PREDICTOR.password_env,
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv(FLOWS.password_env, "short")
    with pytest.raises(UserError) as err:
        main()
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", FLOWS.password_env):
        assert name in str(err.value)
    assert "short" not in str(err.value)
