"""Typed view of params.yaml: one section per stage, validated when loaded."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    model_validator,
)

from common import paths
from common.errors import UserError

PARAMS_FILE = Path("params.yaml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureSpec(_Section):
    """One input column of the model and the contract its values must meet."""

    type: Literal["numeric", "categorical"]
    min: float | None = None
    max: float | None = None
    categories: list[str] | None = None
    max_missing_share: float | None = Field(default=None, ge=0, le=1)

    @model_validator(mode="after")
    def _bounds_fit_type(self) -> FeatureSpec:
        if self.type == "categorical" and (self.min is not None or self.max is not None):
            raise ValueError("min/max apply to numeric features only")
        if self.type == "numeric" and self.categories is not None:
            raise ValueError("categories apply to categorical features only")
        return self


class DataParams(_Section):
    """Where the raw table is and what its columns mean."""

    path: str
    target: str
    id_column: str | None = None
    # Labelled production rows (exported by the retrain flow) that `prepare` appends.
    production_dir: str | None = None
    # Tenants whose labelled rows may train the shared model (their consent). A tenant with a
    # model of its own (`tenants`) trains that model on its own rows only.
    production_tenants: list[str] = Field(default_factory=lambda: ["default"])
    features: dict[str, FeatureSpec]

    @property
    def numeric(self) -> list[str]:
        return [c for c, f in self.features.items() if f.type == "numeric"]

    @property
    def categorical(self) -> list[str]:
        return [c for c, f in self.features.items() if f.type == "categorical"]

    @property
    def feature_names(self) -> list[str]:
        return list(self.features)


class GenerateParams(_Section):
    rows: int = Field(gt=0)
    seed: int
    # Example tenants (models.generate.EXAMPLE_TENANTS) whose own training data the stage
    # also writes, to data/sources/<id>.parquet, and how many rows each.
    tenant_sources: dict[str, PositiveInt] = Field(default_factory=dict)


class PrepareParams(_Section):
    holdout_share: float = Field(gt=0, lt=1)
    reference_rows: int = Field(gt=0)
    seed: int


class ValidateParams(_Section):
    min_rows: int = Field(ge=1)
    max_missing_share: float = Field(ge=0, le=1)
    max_duplicate_share: float = Field(ge=0, le=1)
    examples: int = Field(default=5, ge=1)


class TrainParams(_Section):
    n_estimators: int = Field(gt=0)
    learning_rate: float = Field(gt=0)
    max_depth: int = Field(gt=0)
    subsample: float = Field(gt=0, le=1)
    min_samples_leaf: int = Field(ge=1)
    random_state: int
    onnx_parity_atol: float = Field(gt=0)


Metric = Literal["roc_auc", "f1_macro", "accuracy", "log_loss"]


class PromoteParams(_Section):
    """The promotion policy: what must improve, what must not get worse, who decides."""

    improve: dict[Metric, float] = Field(min_length=1)
    no_worse: dict[Metric, float] = Field(default_factory=dict)
    require_approval: bool = False
    approval_timeout_seconds: int = Field(default=86400, gt=0)

    @model_validator(mode="after")
    def _amounts_not_negative(self) -> PromoteParams:
        for section in ("improve", "no_worse"):
            for metric, amount in getattr(self, section).items():
                if amount < 0:
                    raise ValueError(f"{section}.{metric} must be >= 0")
        return self


class MonitorParams(_Section):
    """Drift monitoring: Evidently's default thresholds, the window size that may decide."""

    window_hours: float = Field(default=24.0, gt=0)
    min_rows: int = Field(default=1000, ge=1)
    drift_share: float = Field(default=0.5, gt=0, le=1)
    num_threshold: float = Field(default=0.1, gt=0)
    cat_threshold: float = Field(default=0.1, gt=0)
    sample_rows: int | None = Field(default=None, gt=0)
    max_rows: int = Field(default=1_000_000, gt=0)
    seed: int = 0
    prediction_column: str = "predicted"
    probability_column: str = "proba_1"
    report_rows: int = Field(default=20_000, gt=0)
    experiment: str = "monitoring"


class RolloutParams(_Section):
    """A canary's ramp on live traffic (flows/rollout.py): the steps, when a step may be
    judged, and how much worse the challenger may be before it is rolled back."""

    steps: list[float] = Field(default_factory=lambda: [10.0, 50.0, 100.0], min_length=1)
    min_samples: int = Field(default=500, ge=1)
    min_labels: int = Field(default=200, ge=1)
    alpha: float = Field(default=0.05, gt=0, lt=1)
    error_rate_margin: float = Field(default=0.01, ge=0, le=1)
    latency_p95_margin_ms: float = Field(default=20.0, ge=0)
    latency_p95_margin_share: float = Field(default=0.2, ge=0)
    accuracy_margin: float = Field(default=0.02, ge=0, le=1)
    roc_auc_margin: float = Field(default=0.02, ge=0, le=1)
    poll_seconds: float = Field(default=30.0, gt=0)
    step_timeout_seconds: float = Field(default=3600.0, gt=0)
    canary: bool = False

    @model_validator(mode="after")
    def _steps_ramp_up(self) -> RolloutParams:
        if any(not 0 < w <= 100 for w in self.steps):
            raise ValueError(f"steps are percentages in (0, 100], got {self.steps}")
        if any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError(f"steps must increase, got {self.steps}")
        return self


class BatchScoreParams(_Section):
    chunk_rows: int = Field(default=100_000, gt=0)


class RetrainParams(_Section):
    """How often a model may be retrained (flows/retrain.py, common.retrain_guard): one
    run per model at a time, and none within `cooldown_minutes` after one ended."""

    cooldown_minutes: float = Field(default=30.0, ge=0)


class TenantSource(_Section):
    """Where a tenant's training data is read from, before anything else runs (`snapshot`).

    Exactly one of `path` (a local path or an `s3://` URL; CSV or Parquet by its suffix) or
    `sql` (a query run through the read-only connection string in the environment variable
    `url_env`: the secret never sits in params.yaml).
    """

    path: str | None = None
    sql: str | None = None
    url_env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$")

    @model_validator(mode="after")
    def _one_source(self) -> TenantSource:
        if (self.path is None) == (self.sql is None):
            raise ValueError("give exactly one of path or sql")
        if self.sql is not None and self.url_env is None:
            raise ValueError("sql needs url_env: the environment variable holding the URL")
        if self.path is not None and self.url_env is not None:
            raise ValueError("url_env applies to sql sources only")
        return self

    def describe(self) -> str:
        """The source in a message: the path, or the query and where its URL comes from."""
        return self.path if self.path is not None else f"SQL via ${self.url_env}: {self.sql}"


TENANT_ID = r"^[a-z0-9-]{1,32}$"
"""The tenants table's rule (common.store.tenants), repeated for params.yaml's keys."""


class TenantParams(_Section):
    """A tenant with a model of its own: its data source and any section it overrides.

    An override names only the keys it changes; the rest come from the shared section.
    """

    source: TenantSource
    prepare: dict[str, Any] = Field(default_factory=dict)
    validate_: dict[str, Any] = Field(default_factory=dict, alias="validate")
    train: dict[str, Any] = Field(default_factory=dict)
    promote: dict[str, Any] = Field(default_factory=dict)
    monitor: dict[str, Any] = Field(default_factory=dict)
    rollout: dict[str, Any] = Field(default_factory=dict)


class Params(_Section):
    data: DataParams
    generate: GenerateParams
    prepare: PrepareParams
    validate_: ValidateParams = Field(alias="validate")
    train: TrainParams
    promote: PromoteParams
    batch_score: BatchScoreParams = Field(default_factory=BatchScoreParams)
    retrain: RetrainParams = Field(default_factory=RetrainParams)
    monitor: MonitorParams = Field(default_factory=MonitorParams)
    rollout: RolloutParams = Field(default_factory=RolloutParams)
    tenants: dict[str, TenantParams] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _tenant_ids_valid(self) -> Params:
        for tenant in self.tenants:
            if not re.fullmatch(TENANT_ID, tenant):
                raise ValueError(f"tenant id {tenant!r} must match {TENANT_ID}")
        for tenant in self.tenants:
            self.for_tenant(tenant)  # every override must make a valid section
        return self

    def model_owner(self, tenant: str | None) -> str | None:
        """Whose model serves `tenant`: itself if it has one here, else None (the shared)."""
        return tenant if tenant in self.tenants else None

    def for_tenant(self, tenant: str | None) -> Params:
        """The params of `tenant`'s own pipeline: its snapshot as the raw table, its own
        production rows, its overrides on the shared sections. None: these params."""
        if tenant is None:
            return self
        own = self.tenants.get(tenant)
        if own is None:
            raise UserError(
                f"tenant {tenant!r} has no model of its own in params.yaml "
                f"(tenants: {sorted(self.tenants) or 'none'}); add a `tenants.{tenant}` "
                "section with its data source."
            )
        where = paths.layout(tenant)
        data = self.data.model_copy(
            update={
                "path": str(where.SNAPSHOT),
                "production_dir": str(where.PRODUCTION),
                "production_tenants": [tenant],
            }
        )
        raw = self.model_dump(by_alias=True, exclude={"tenants", "data"})
        for section, override in (
            ("prepare", own.prepare),
            ("validate", own.validate_),
            ("train", own.train),
            ("promote", own.promote),
            ("monitor", own.monitor),
            ("rollout", own.rollout),
        ):
            raw[section] = {**raw[section], **override}
        try:
            merged = Params.model_validate({**raw, "data": data.model_dump()})
        except ValidationError as exc:
            raise ValueError(f"tenants.{tenant}: {_problems(exc)}") from exc
        return merged


def load_params(path: Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; a bad file is a UserError naming the key."""
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise UserError(f"{path} not found: run from the repository root.") from exc
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from exc
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{path} is invalid: {_problems(exc)}") from exc


def stage_tenant(argv: Sequence[str] | None = None, *, required: bool = False) -> str | None:
    """A stage's `--tenant <id>` (dvc.yaml's per-tenant stages pass it); None: the shared model."""
    parser = argparse.ArgumentParser(description="one stage of the pipeline (dvc.yaml)")
    parser.add_argument(
        "--tenant",
        required=required,
        help="run the stage of this tenant's own model (params.yaml `tenants`)",
    )
    tenant: str | None = parser.parse_args(argv).tenant
    return tenant


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        # a bad mapping key comes as (..., key, "[key]"): name the key itself
        f"{'.'.join(str(p) for p in e['loc'] if p != '[key]')}: {e['msg']}"
        for e in exc.errors()
    )
