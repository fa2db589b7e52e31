"""MLflow tracking and registry helpers shared by the pipeline, flows and the service.

`common.registry.tags` names every model-version tag; `common.registry.served` is the
handle on one version to serve (alias -> version -> local files -> scorer).
"""

from __future__ import annotations

import os
import secrets
import shutil
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from common.errors import UserError
from common.registry import tags as tag
from common.settings import Settings

CHAMPION = "champion"
CHALLENGER = "challenger"


TENANT_SEPARATOR = "."
"""A tenant's own model is registered as `<MODEL_NAME>.<tenant>`: `churn-classifier.acme`."""


def model_name(settings: Settings, tenant: str | None = None) -> str:
    """The registered model of `tenant`'s own model; None: the shared model (MODEL_NAME)."""
    return settings.model_name if tenant is None else f"{settings.model_name}.{tenant}"


def tenant_of(settings: Settings, name: str) -> str | None:
    """The tenant whose own model `name` is; None for the shared model or another name."""
    prefix = settings.model_name + TENANT_SEPARATOR
    return name.removeprefix(prefix) if name.startswith(prefix) else None


def connect(settings: Settings) -> MlflowClient:
    """Point MLflow at the configured store; a server that does not answer is a UserError."""
    settings.export_tool_env()
    uri = settings.tracking_uri
    if settings.embedded:
        settings.mlops_home.mkdir(parents=True, exist_ok=True)
    elif uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10):
                pass
        except (urllib.error.URLError, OSError) as exc:
            raise UserError(
                f"MLflow server at MLFLOW_TRACKING_URI={uri} is not reachable ({exc}); "
                "start it or unset MLFLOW_TRACKING_URI for the embedded store."
            ) from exc
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client: MlflowClient, settings: Settings, name: str | None = None) -> str:
    """The experiment's id, created on first use (with the embedded artifact root if local)."""
    name = name or settings.mlflow_experiment_name
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    return str(client.create_experiment(name, artifact_location=settings.artifact_root))


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version an alias points at, or None when the model or alias does not exist.

    MLflow's basic-auth app answers an alias lookup on a model that does not exist with
    403, not 404: then the model itself is looked up, which says which it is.
    """
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        if exc.error_code == "PERMISSION_DENIED" and not _model_exists(client, name):
            return None
        raise


@dataclass(frozen=True)
class ModelState:
    """A registered model's aliases (alias -> version) and its own tags, as one search saw them."""

    aliases: Mapping[str, str]
    tags: Mapping[str, str]


def model_states(client: MlflowClient, name: str) -> dict[str, ModelState]:
    """Aliases and registered-model tags of `name` and every tenant's `<name>.<tenant>`.

    One search (a call a page of a hundred models), however many tenants have models of
    their own: what a serving process reads each poll (champion, challenger, shadow, and
    the challenger's weight tag).
    """
    found: dict[str, ModelState] = {}
    token: str | None = None
    while True:
        page = client.search_registered_models(
            filter_string=f"name LIKE '{name}%'", max_results=100, page_token=token
        )
        for model in page:
            if model.name == name or model.name.startswith(name + TENANT_SEPARATOR):
                aliases = {str(a): str(v) for a, v in (model.aliases or {}).items()}
                found[model.name] = ModelState(aliases, dict(model.tags or {}))
        token = page.token
        if not token:
            return found


def aliased_versions(client: MlflowClient, name: str, alias: str) -> dict[str, str]:
    """`alias`'s version of `name` and of every tenant's `<name>.<tenant>`, in one search.

    Registered name -> version; a model without the alias is left out.
    """
    return {
        model: state.aliases[alias]
        for model, state in model_states(client, name).items()
        if alias in state.aliases
    }


def _model_exists(client: MlflowClient, name: str) -> bool:
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def move_alias(
    client: MlflowClient,
    name: str,
    alias: str,
    version: str,
    *,
    by: str,
    reason: str,
    at: str | None = None,
) -> None:
    """Point `alias` at `version` and record on that version who moved it, when and why.

    `champion` moves only through `common.registry.promotion.move_champion`, which calls
    this and records the rest (the champion replaced, the evidence).
    """
    client.set_registered_model_alias(name, alias, version)
    at = at or datetime.now(UTC).isoformat(timespec="seconds")
    record = {tag.ALIAS_SET_BY: by, tag.ALIAS_SET_AT: at, tag.ALIAS_REASON: reason}
    for key, value in record.items():
        client.set_model_version_tag(name, version, tag.alias_tag(alias, key), value)


def set_tags(client: MlflowClient, name: str, version: str, tags: dict[str, Any]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


class ArtifactsUnavailableError(RuntimeError):
    """A version's files could not be had from the artifact store: try again later."""


def download_version(cache: Path, name: str, version: str) -> Path:
    """The model version's files under `cache/name/version`, downloaded once.

    Processes that download side by side each use a folder of their own; the first
    rename wins and the others drop theirs. A failed download leaves nothing behind, and
    one without an MLmodel file is a failed download (ArtifactsUnavailableError): MLflow's
    artifact proxy lists nothing while its S3 is down, which is no verdict on the model.
    """
    target = cache / name / version
    if (target / "MLmodel").exists():
        return target
    tmp = cache / name / f".{version}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir(parents=True)
    try:
        mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(tmp))
        if not (tmp / "MLmodel").exists():
            raise ArtifactsUnavailableError(
                f"models:/{name}/{version}: the artifact store returned no MLmodel file "
                "(is it reachable?); tried again at the next check"
            )
        tmp.rename(target)
    except OSError:
        if not (target / "MLmodel").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def log_run(
    settings: Settings,
    experiment: str,
    run_name: str,
    *,
    tags: Mapping[str, str],
    metrics: Mapping[str, float],
    artifacts: Path,
    artifact_path: str,
) -> tuple[str, str]:
    """One finished run of `experiment`: its tags, metrics and the files under `artifacts`.

    Returns the run id and the URI the files are under (`<artifact root>/<artifact_path>`).
    """
    client = connect(settings)
    exp_id = experiment_id(client, settings, experiment)
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name) as run:
        mlflow.set_tags(dict(tags))
        mlflow.log_metrics(dict(metrics))
        mlflow.log_artifacts(str(artifacts), artifact_path=artifact_path)
    return run.info.run_id, f"{run.info.artifact_uri}/{artifact_path}"
