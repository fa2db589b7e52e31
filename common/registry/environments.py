"""Promotion across environments: dev -> staging -> prod, one step at a time.

Each environment has its own registered model (`settings.model_name_in(env)`; a tenant's
own model `<that>.<tenant>`). Promoting copies the source version's FILES into a new run of
the target environment's experiment (`<MLFLOW_EXPERIMENT_NAME>-<env>`) and registers the
target version from that copy, so deleting the dev version and its artifacts never breaks
staging or prod. The target version keeps the source's lineage tags and records where it
came from (`env.*`) and who let it in (`approval.*`, tags.py); its `champion` then moves
through `promotion.move_champion`, like every champion.

What may move: dev -> staging needs a dev version whose gate passed (dev's champion unless
one is named); staging -> prod needs staging's champion.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from common.errors import UserError
from common.registry import (
    CHAMPION,
    TENANT_SEPARATOR,
    log_run,
    promotion,
    set_tags,
    trust,
    version_by_alias,
)
from common.registry import tags as tag
from common.settings import ENVIRONMENTS, Environment, Settings

COPIED_PATH = "model"
"""Where a copy run keeps the version's files (its artifact path)."""
GATE_PASSED = {
    tag.GATE_DECISION: ("promoted", "held"),  # held: passed, waiting for a person
    tag.PROMOTE_DECISION: (promotion.PROMOTED, promotion.RESTORED),
}
NOT_COPIED = (tag.ALIAS_PREFIX, "promote.", "env.", "approval.", "mlflow.")
"""Source tags that describe the source environment's own decisions, not the model."""


@dataclass(frozen=True)
class Step:
    """One promotion: which version of which model goes where."""

    source_env: Environment
    target_env: Environment
    source_model: str
    source_version: str
    target_model: str
    tenant: str | None

    def describe(self) -> str:
        return (
            f"{self.source_model} v{self.source_version} ({self.source_env}) -> "
            f"{self.target_model} ({self.target_env})"
        )


def source_of(target: str) -> Environment:
    """The environment a version comes from on its way to `target`."""
    if target not in ENVIRONMENTS or target == ENVIRONMENTS[0]:
        allowed = ", ".join(ENVIRONMENTS[1:])
        raise UserError(
            f"--to {target!r}: promote to one of {allowed} (order: dev -> staging -> prod)"
        )
    return ENVIRONMENTS[ENVIRONMENTS.index(target) - 1]


def registered_name(settings: Settings, env: Environment, tenant: str | None) -> str:
    """Environment `env`'s registered model for `tenant` (None: the shared one)."""
    base = settings.model_name_in(env)
    return base if tenant is None else f"{base}{TENANT_SEPARATOR}{tenant}"


def plan(
    client: MlflowClient,
    settings: Settings,
    target: str,
    *,
    tenant: str | None = None,
    version: str | None = None,
) -> Step:
    """The step to take to `target`, checked; a UserError says why it may not move."""
    source = source_of(target)
    target_env: Environment = ENVIRONMENTS[ENVIRONMENTS.index(source) + 1]
    src = registered_name(settings, source, tenant)
    champion = version_by_alias(client, src, CHAMPION)
    if source != ENVIRONMENTS[0]:
        if champion is None:
            raise UserError(f"{src} has no {CHAMPION}: promote to {source} first")
        if version is not None and str(version) != str(champion.version):
            raise UserError(
                f"{src} v{version} is not {source}'s {CHAMPION} (v{champion.version}): only "
                f"{source}'s {CHAMPION} goes on to {target_env}"
            )
        chosen = champion
    elif version is None:
        if champion is None:
            raise UserError(
                f"{src} has no {CHAMPION}: train and pass the gate in {source} first, "
                "or name a version (--version N)"
            )
        chosen = champion
    else:
        chosen = _version(client, src, str(version))
    if source == ENVIRONMENTS[0] and not _gate_passed(chosen.tags):
        decisions = {k: chosen.tags.get(k, "(none)") for k in GATE_PASSED}
        raise UserError(
            f"{src} v{chosen.version} did not pass the gate in {source} ({decisions}): "
            f"only a version the gate passed goes on to {target_env}"
        )
    return Step(
        source,
        target_env,
        src,
        str(chosen.version),
        registered_name(settings, target_env, tenant),
        tenant,
    )


def _gate_passed(tags: Mapping[str, str]) -> bool:
    return any(tags.get(key) in values for key, values in GATE_PASSED.items())


def _version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    try:
        return client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            raise UserError(f"{name} v{version} does not exist") from None
        raise


def existing_copy(client: MlflowClient, step: Step) -> ModelVersion | None:
    """A version of the target model already copied from this source version, if any."""
    try:
        versions = client.search_model_versions(f"name = '{step.target_model}'")
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED"):
            return None
        raise
    for mv in versions:
        if (
            mv.tags.get(tag.ENV_SOURCE_MODEL) == step.source_model
            and mv.tags.get(tag.ENV_SOURCE_VERSION) == step.source_version
        ):
            return mv
    return None


def lineage_tags(source: ModelVersion, step: Step, at: str) -> dict[str, str]:
    """The target version's tags: the source's lineage, then where it came from."""
    inherited = {
        k: v for k, v in source.tags.items() if not k.startswith(NOT_COPIED) and k != "tenant"
    }
    if step.tenant:
        inherited[tag.TENANT] = step.tenant
    earlier = json.loads(source.tags.get(tag.ENV_LINEAGE, "[]"))
    chain = [{"env": step.source_env, "model": step.source_model, "version": step.source_version}]
    metrics = source.tags.get(tag.METRICS) or json.dumps(
        {
            k.removeprefix(tag.METRIC_PREFIX): v
            for k, v in source.tags.items()
            if k.startswith(tag.METRIC_PREFIX)
        }
    )
    return {
        **inherited,
        tag.ENV_SOURCE: step.source_env,
        tag.ENV_SOURCE_MODEL: step.source_model,
        tag.ENV_SOURCE_VERSION: step.source_version,
        tag.ENV_SOURCE_RUN_ID: source.run_id or "",
        tag.ENV_LINEAGE: promotion.shorten(json.dumps(chain + earlier)),
        tag.ENV_GATE_METRICS: promotion.shorten(metrics),
        tag.ENV_PROMOTED_AT: at,
        tag.MLFLOW_RUN_ID: source.tags.get(tag.MLFLOW_RUN_ID) or source.run_id or "",
        tag.MANIFEST_SHA256: source.tags.get(tag.MANIFEST_SHA256, ""),
    }


def copy_version(
    client: MlflowClient, settings: Settings, step: Step, *, extra: Mapping[str, str]
) -> ModelVersion:
    """Copy the source version's files into a run of the target environment and register
    them as a new version of the target model, tagged (`extra`: the approval's tags)."""
    source = _version(client, step.source_model, step.source_version)
    tags = {k: v for k, v in {**lineage_tags(source, step, promotion.now()), **extra}.items() if v}
    with tempfile.TemporaryDirectory(prefix="mlops-promote-") as tmp:
        files = Path(tmp) / "files"
        mlflow.artifacts.download_artifacts(
            f"models:/{step.source_model}/{step.source_version}", dst_path=str(files)
        )
        # only the files sealed for the source go on; the copy keeps its manifest tag
        trust.check(files, source.tags, f"models:/{step.source_model}/{step.source_version}")
        run_id, uri = log_run(
            settings,
            f"{settings.mlflow_experiment_name}-{step.target_env}",
            f"promote {step.source_model} v{step.source_version} to {step.target_env}",
            tags={k: v for k, v in tags.items() if k.startswith(("env.", "approval."))},
            metrics={},
            artifacts=files,
            artifact_path=COPIED_PATH,
        )
    _ensure_model(client, step.target_model)
    return client.create_model_version(
        step.target_model, source=uri, run_id=run_id, tags=tags, description=step.describe()
    )


def _ensure_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def promote(
    client: MlflowClient,
    settings: Settings,
    step: Step,
    *,
    by: str,
    reason: str,
    approval: Mapping[str, str] | None = None,
) -> promotion.Move:
    """Copy (once) and make the copy the target environment's champion, recording the
    source, the gate's metrics and the approval as the move's evidence."""
    approval = dict(approval or {})
    copied = existing_copy(client, step)
    if copied is None:
        copied = copy_version(client, settings, step, extra=approval)
    elif approval:  # copied before, approved now: the approval that moved it is recorded
        set_tags(client, step.target_model, str(copied.version), approval)
    mv = client.get_model_version(step.target_model, str(copied.version))
    evidence: dict[str, Any] = {
        "source": {
            "env": step.source_env,
            "model": step.source_model,
            "version": step.source_version,
        },
        "gate_metrics": json.loads(mv.tags.get(tag.ENV_GATE_METRICS) or "{}"),
    }
    if approval:
        evidence["approval"] = {
            k.removeprefix("approval."): v
            for k, v in approval.items()
            if k != tag.APPROVAL_SIGNATURE
        }
    return promotion.move_champion(
        client, step.target_model, str(mv.version), by=by, reason=reason, evidence=evidence
    )
