"""The one settings object: infrastructure from the environment and `.env`.

Variable names are the tools' own (MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME,
MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, PREFECT_API_URL, EVIDENTLY_SECRET, ...) plus the
project's DATABASE_URL, MODEL_NAME and MODEL_ALIAS. With nothing set, everything is
embedded under MLOPS_HOME (.mlops/). Secrets have no defaults and never appear in a repr.

The dotenv file is `.env` in the working directory, or the file MLOPS_ENV_FILE names (the
test suite points it at nothing, so a user's `.env` in the checkout never reaches a test).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from dotenv import dotenv_values
from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from common.errors import UserError

Environment = Literal["dev", "staging", "prod"]
ENVIRONMENTS: tuple[Environment, ...] = ("dev", "staging", "prod")
"""In promotion order: a version moves dev -> staging -> prod."""

ENV_FILE = "MLOPS_ENV_FILE"
"""The variable naming the dotenv file to read instead of `.env` in the working directory."""


class Settings(BaseSettings):
    """Where the stack's state lives; only these differ between embedded and full stack."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True
    )

    mlops_home: Path = Field(default=Path(".mlops"), alias="MLOPS_HOME")
    mlflow_tracking_uri: str | None = Field(default=None, alias="MLFLOW_TRACKING_URI")
    # An MLflow server with its basic-auth app: this service's user (MLflow reads both too).
    mlflow_tracking_username: str | None = Field(default=None, alias="MLFLOW_TRACKING_USERNAME")
    mlflow_tracking_password: SecretStr | None = Field(
        default=None, alias="MLFLOW_TRACKING_PASSWORD"
    )
    mlflow_experiment_name: str = Field(default="churn-training", alias="MLFLOW_EXPERIMENT_NAME")
    mlflow_s3_endpoint_url: str | None = Field(default=None, alias="MLFLOW_S3_ENDPOINT_URL")
    aws_access_key_id: str | None = Field(default=None, alias="AWS_ACCESS_KEY_ID")
    aws_secret_access_key: str | None = Field(default=None, alias="AWS_SECRET_ACCESS_KEY")
    prefect_api_url: str | None = Field(default=None, alias="PREFECT_API_URL")
    # Set by Prefect in a flow run's process; recorded on model versions for lineage.
    prefect_flow_run_id: str | None = Field(default=None, alias="PREFECT__FLOW_RUN_ID")
    database_url: str | None = Field(default=None, alias="DATABASE_URL")
    # Where initdb/postgres live, for the embedded PostgreSQL (found automatically if unset).
    pg_bin: Path | None = Field(default=None, alias="PG_BIN")
    # The environment this process works in (dev, staging, prod): it picks the registered
    # model (`model_name`), the embedded database (common.localpg.embedded_database), the
    # work pool (`work_pool`) and its own state dir (`env_home`); the full stack runs one
    # copy per environment (`make up ENV=staging`, scripts/stack.py).
    mlops_env: Environment = Field(default="dev", alias="MLOPS_ENV")
    # This environment's Prefect work pool (deployments target it; `make worker` serves it):
    # unset, `local-process` in dev and `local-process-<env>` else (`work_pool`).
    prefect_work_pool: str | None = Field(default=None, alias="PREFECT_WORK_POOL")
    # The model's base name; `model_name` is this environment's registered model.
    model_base: str = Field(default="churn-classifier", alias="MODEL_NAME")
    model_alias: str = Field(default="champion", alias="MODEL_ALIAS")
    # Serving: how often the predictor checks the alias, and the largest batch it accepts.
    model_poll_seconds: float = Field(default=10.0, gt=0, alias="MODEL_POLL_SECONDS")
    # Tenants' own models (`<MODEL_NAME>.<tenant>`) a worker keeps loaded beside the shared
    # one; the least recently used is dropped past this and loaded again on its next request.
    model_cache_size: int = Field(default=32, ge=1, alias="MODEL_CACHE_SIZE")
    predict_max_batch: int = Field(default=1000, ge=1, alias="PREDICT_MAX_BATCH")
    # Bounded request work, per predictor worker process (services.predictor.guard): API
    # requests in flight at once, and bytes of their bodies held at once (over either: 503
    # with Retry-After, before the body is read); /predict's body may be PREDICT_MAX_BATCH
    # records of PREDICT_MAX_RECORD_BYTES each (more: 413 before it is parsed).
    predict_max_concurrency: int = Field(default=64, ge=1, alias="PREDICT_MAX_CONCURRENCY")
    predict_max_record_bytes: int = Field(default=4096, ge=256, alias="PREDICT_MAX_RECORD_BYTES")
    predict_max_inflight_bytes: int = Field(
        default=128 * 1024 * 1024, ge=1024, alias="PREDICT_MAX_INFLIGHT_BYTES"
    )
    # A value outside the range the served model's data contract declares: "refuse" (400
    # naming the field) or "flag" (scored, with a `warnings` list on that prediction).
    predict_out_of_range: Literal["refuse", "flag"] = Field(
        default="refuse", alias="PREDICT_OUT_OF_RANGE"
    )
    # API keys: how long a worker trusts a key it checked (revocations still end it at
    # once; 0 asks PostgreSQL on every request), and the secret MLflow signs registry
    # webhooks with (set: /webhooks/mlflow takes MLflow's signature instead of a key).
    api_key_cache_seconds: float = Field(default=30.0, ge=0, alias="API_KEY_CACHE_SECONDS")
    mlflow_webhook_secret: SecretStr | None = Field(default=None, alias="MLFLOW_WEBHOOK_SECRET")
    # Monitoring: the Evidently workspace (a directory, or an `evidently ui` URL to upload
    # to) and an optional URL that drift alerts are POSTed to (a paging or chat webhook).
    evidently_workspace: str | None = Field(default=None, alias="EVIDENTLY_WORKSPACE")
    # The secret an `evidently ui` started with EVIDENTLY_SECRET wants for writes (uploads).
    evidently_secret: SecretStr | None = Field(default=None, alias="EVIDENTLY_SECRET")
    monitor_webhook_url: str | None = Field(default=None, alias="MONITOR_WEBHOOK_URL")
    # The prediction log's write-ahead files: seconds between fsyncs (what a host crash may
    # lose; 0: fsync each row before its answer), and the most rows not yet in PostgreSQL
    # (past it /predict and /feedback answer 503 and /readyz fails).
    predlog_sync_interval: float = Field(default=1.0, ge=0, alias="PREDLOG_SYNC_INTERVAL")
    predlog_max_backlog: int = Field(default=1_000_000, ge=1, alias="PREDLOG_MAX_BACKLOG")
    # Asynchronous jobs (POST /jobs, the workers): the most records a job may hold, the
    # largest body /jobs reads (larger: 413 before parsing), and the records per queue
    # message (a worker scores one message at a time, a job's chunks in parallel).
    job_max_records: int = Field(default=100_000, ge=1, alias="JOB_MAX_RECORDS")
    job_max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1, alias="JOB_MAX_BODY_BYTES")
    job_chunk_records: int = Field(default=1000, ge=1, alias="JOB_CHUNK_RECORDS")
    # Delivery: a chunk a worker took and did not finish within the visibility timeout is
    # delivered again; after JOB_MAX_TRIES deliveries it goes to the dead-letter queue.
    job_visibility_timeout: float = Field(default=30.0, gt=0, alias="JOB_VISIBILITY_TIMEOUT")
    job_max_tries: int = Field(default=5, ge=1, alias="JOB_MAX_TRIES")
    # Ended jobs, their results and their response/dead-letter messages are kept this long.
    job_retention_hours: float = Field(default=168.0, gt=0, alias="JOB_RETENTION_HOURS")
    # Callbacks: the hosts a job's callback_url may name (comma-separated; empty: callbacks
    # are refused), and the secret their HMAC-SHA256 signature is made with.
    job_callback_hosts: str = Field(default="", alias="JOB_CALLBACK_HOSTS")
    job_callback_secret: SecretStr | None = Field(default=None, alias="JOB_CALLBACK_SECRET")
    # Reviewers who may approve a promotion to prod: `<name> ssh-ed25519 AAAA...` a line
    # (git's allowed_signers format); unset: MLOPS_HOME/reviewers.
    mlops_reviewers_file: Path | None = Field(default=None, alias="MLOPS_REVIEWERS_FILE")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """pydantic-settings' order (arguments, environment, dotenv, secrets); the dotenv
        file is MLOPS_ENV_FILE's when set (a missing file, or os.devnull, reads nothing)."""
        chosen = os.environ.get(ENV_FILE)
        if chosen is not None:
            dotenv_settings = DotEnvSettingsSource(settings_cls, env_file=Path(chosen))
        return init_settings, env_settings, dotenv_settings, file_secret_settings

    @model_validator(mode="after")
    def _s3_needs_credentials(self) -> Settings:
        if self.mlflow_s3_endpoint_url:
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                if not getattr(self, name.lower()):
                    raise ValueError(f"{name} must be set when MLFLOW_S3_ENDPOINT_URL is set")
        return self

    @model_validator(mode="after")
    def _mlflow_user_needs_password(self) -> Settings:
        user, password = self.mlflow_tracking_username, self.mlflow_tracking_password
        if bool(user) != bool(password):
            given, missing = ("USERNAME", "PASSWORD") if user else ("PASSWORD", "USERNAME")
            raise ValueError(f"MLFLOW_TRACKING_{missing} must be set with MLFLOW_TRACKING_{given}")
        return self

    @property
    def model_name(self) -> str:
        """This environment's registered model: MODEL_NAME in dev, `<MODEL_NAME>-<env>` else."""
        return self.model_name_in(self.mlops_env)

    def model_name_in(self, env: Environment) -> str:
        """The registered model of environment `env` (one registered model per environment)."""
        return self.model_base if env == "dev" else f"{self.model_base}-{env}"

    @property
    def env_home(self) -> Path:
        """This environment's own state (the Evidently workspace, spill files): MLOPS_HOME in
        dev, MLOPS_HOME/<env> else. The MLflow store and the model cache stay shared: the
        three registered models live side by side, so promotion copies between them."""
        return self.mlops_home if self.mlops_env == "dev" else self.mlops_home / self.mlops_env

    @property
    def work_pool(self) -> str:
        """PREFECT_WORK_POOL, else `local-process` in dev and `local-process-<env>` else."""
        if self.prefect_work_pool:
            return self.prefect_work_pool
        return "local-process" if self.mlops_env == "dev" else f"local-process-{self.mlops_env}"

    @property
    def reviewers_file(self) -> Path:
        """The registered reviewers' keys: MLOPS_REVIEWERS_FILE, else MLOPS_HOME/reviewers."""
        return self.mlops_reviewers_file or self.mlops_home / "reviewers"

    @property
    def tracking_uri(self) -> str:
        """MLflow's store: the server if one is set, else a SQLite file under MLOPS_HOME."""
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{(self.mlops_home / 'mlflow.db').resolve()}"

    @property
    def embedded(self) -> bool:
        """No tracking server: a store file (or database) here, artifacts under MLOPS_HOME.

        A sqlite: URI counts as embedded too; MLflow's own `set_tracking_uri` exports the
        embedded one as MLFLOW_TRACKING_URI, and settings read after that must agree.
        """
        uri = self.mlflow_tracking_uri
        return uri is None or not uri.startswith(("http://", "https://", "databricks"))

    @property
    def evidently_target(self) -> str:
        """Where monitoring snapshots go: EVIDENTLY_WORKSPACE, else `env_home`/evidently."""
        if self.evidently_workspace:
            return self.evidently_workspace
        return str((self.env_home / "evidently").resolve())

    @property
    def artifact_root(self) -> str | None:
        """Artifact root of new experiments in embedded mode (a server decides its own)."""
        if not self.embedded:
            return None
        return (self.mlops_home / "mlartifacts").resolve().as_uri()

    def variable(self, name: str) -> str | None:
        """A variable params.yaml names (a tenant source's `url_env`), read as the settings
        are: the environment, then the dotenv file. None when neither sets it."""
        if name in os.environ:
            return os.environ[name] or None
        dotenv = Path(os.environ.get(ENV_FILE, ".env"))
        return (dotenv_values(dotenv).get(name) or None) if dotenv.is_file() else None

    def export_tool_env(self) -> None:
        """Hand the S3 settings and MLflow's user to boto3/MLflow, which read the process env.

        (They may have come from `.env`, which those libraries do not read.)
        """
        for name in (
            "MLFLOW_S3_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
        ):
            value = getattr(self, name.lower())
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if value:
                os.environ[name] = value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Load settings once; a bad environment is a UserError naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise UserError(f"invalid environment: {problems}") from exc
