"""Settings: embedded by default, and a half-configured S3 store is caught at start-up."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import UserError
from common.settings import ENV_FILE, Settings, get_settings
from tests.workspace import ROOT

VARIABLES = [
    str(field.alias) for field in Settings.model_fields.values() if field.alias is not None
]


@pytest.fixture(autouse=True)
def bare_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No settings variables and no .env: run in an empty directory with them all unset."""
    for name in VARIABLES:
        monkeypatch.setenv(name, "")  # so monkeypatch restores the original on teardown
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


@pytest.fixture
def as_a_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """As a user's shell runs a CLI: no MLOPS_ENV_FILE (the suite sets one), so `.env` is read."""
    monkeypatch.delenv(ENV_FILE, raising=False)


def _cli_model_name(cwd: Path, env: dict[str, str]) -> str:
    """What a fresh process started in `cwd` with `env` takes MODEL_NAME to be."""
    code = "from common.settings import get_settings; print(get_settings().model_name)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip()


def test_a_dotenv_in_the_checkout_reaches_no_test_nor_the_processes_tests_start(
    bare_environment: Path,
) -> None:
    """The checkout is the working directory of most test runs; here a stand-in for it."""
    (bare_environment / ".env").write_text("MODEL_NAME=wrong\nMLOPS_HOME=/nowhere\n")

    assert os.environ[ENV_FILE] == os.devnull  # set for the whole session by tests/conftest.py
    assert get_settings().model_name == "churn-classifier"
    assert get_settings().mlops_home != Path("/nowhere")
    assert _cli_model_name(bare_environment, dict(os.environ)) == "churn-classifier"


@pytest.mark.usefixtures("as_a_user")
def test_a_users_dotenv_still_configures_the_cli(bare_environment: Path) -> None:
    (bare_environment / ".env").write_text("MODEL_NAME=wrong\n")

    assert _cli_model_name(bare_environment, dict(os.environ)) == "wrong"
    assert get_settings().model_name == "wrong"


def test_mlops_env_file_names_the_dotenv_to_read(
    bare_environment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (bare_environment / ".env").write_text("MODEL_NAME=from-dotenv\n")
    (bare_environment / "prod.env").write_text("MODEL_NAME=from-prod\n")
    monkeypatch.setenv(ENV_FILE, str(bare_environment / "prod.env"))

    assert get_settings().model_name == "from-prod"


def test_knows_the_tools_own_variable_names() -> None:
    assert {"MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"} <= set(VARIABLES)


def test_defaults_to_an_embedded_store_under_mlops_home(bare_environment: Path) -> None:
    settings = get_settings()
    home = (bare_environment / ".mlops").resolve()
    assert settings.embedded
    assert settings.mlops_home == Path(".mlops")
    assert settings.tracking_uri == f"sqlite:///{home / 'mlflow.db'}"
    assert settings.artifact_root == (home / "mlartifacts").as_uri()
    assert settings.model_name == "churn-classifier"
    assert settings.model_alias == "champion"


def test_mlops_home_moves_the_embedded_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / "state"))
    settings = get_settings()
    assert settings.tracking_uri == f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}"
    assert settings.artifact_root is not None
    assert settings.artifact_root.startswith((tmp_path / "state").as_uri())


def test_a_tracking_server_turns_off_embedded_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    settings = get_settings()
    assert not settings.embedded
    assert settings.tracking_uri == "http://mlflow:5000"
    assert settings.artifact_root is None


@pytest.mark.usefixtures("as_a_user")
def test_reads_a_dotenv_file_in_the_working_directory(bare_environment: Path) -> None:
    (bare_environment / ".env").write_text("MODEL_NAME=from-dotenv\n")
    assert get_settings().model_name == "from-dotenv"


@pytest.mark.usefixtures("as_a_user")
def test_environment_wins_over_dotenv(
    bare_environment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (bare_environment / ".env").write_text("MODEL_NAME=from-dotenv\n")
    monkeypatch.setenv("MODEL_NAME", "from-env")
    assert Settings().model_name == "from-env"


def test_s3_endpoint_without_keys_names_the_missing_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://minio:9000")
    with pytest.raises(UserError, match="AWS_ACCESS_KEY_ID") as err:
        get_settings()
    assert "MLFLOW_S3_ENDPOINT_URL" in str(err.value)
    assert "\n" not in str(err.value)


def test_s3_endpoint_without_secret_names_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "minio")
    with pytest.raises(UserError, match="AWS_SECRET_ACCESS_KEY"):
        get_settings()


@pytest.mark.usefixtures("as_a_user")
def test_s3_settings_from_dotenv_are_handed_to_the_tools(bare_environment: Path) -> None:
    (bare_environment / ".env").write_text(
        "MLFLOW_S3_ENDPOINT_URL=http://minio:9000\n"
        "AWS_ACCESS_KEY_ID=minio\n"
        "AWS_SECRET_ACCESS_KEY=secret\n"
    )
    get_settings().export_tool_env()  # the fixture's monkeypatch restores the environment
    assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert os.environ["AWS_ACCESS_KEY_ID"] == "minio"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "secret"


def test_settings_are_loaded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    first = get_settings()
    monkeypatch.setenv("MODEL_NAME", "changed")
    assert get_settings() is first


def test_the_embedded_store_exported_by_mlflow_stays_embedded(
    monkeypatch: pytest.MonkeyPatch, bare_environment: Path
) -> None:
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI; artifacts must stay local."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{bare_environment}/.mlops/mlflow.db")
    settings = get_settings()
    assert settings.embedded
    assert settings.artifact_root == (bare_environment / ".mlops" / "mlartifacts").as_uri()


def test_an_mlflow_user_without_its_password_names_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "flows")
    with pytest.raises(UserError, match="MLFLOW_TRACKING_PASSWORD must be set"):
        get_settings()


def test_secrets_never_show_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "flows")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "flows-password-1")
    monkeypatch.setenv("EVIDENTLY_SECRET", "evidently-secret-1")
    settings = get_settings()
    assert "flows-password-1" not in repr(settings)
    assert "evidently-secret-1" not in repr(settings)
    assert settings.evidently_secret is not None
    assert settings.evidently_secret.get_secret_value() == "evidently-secret-1"


@pytest.mark.usefixtures("as_a_user")
def test_an_mlflow_user_from_dotenv_is_handed_to_mlflow(bare_environment: Path) -> None:
    (bare_environment / ".env").write_text(
        "MLFLOW_TRACKING_USERNAME=flows\nMLFLOW_TRACKING_PASSWORD=flows-password-1\n"
    )
    get_settings().export_tool_env()
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "flows"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "flows-password-1"
