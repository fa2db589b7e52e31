"""The MLflow server's auth app: MLflow's basic-auth, plus the two rules it lacks.

`mlflow server --app-name mlops-auth` (pyproject's `mlflow.app` entry point) runs the
basic-auth app unchanged (users, grants, the admin from MLFLOW_AUTH_CONFIG_PATH), then
checks one thing basic-auth cannot express: grants are per registered model, never per
alias, so anyone with EDIT on a model could point its `champion` alias at any version.
Here only the promotion identities (MLOPS_CHAMPION_MOVERS, comma-separated usernames;
`flows` unless set) and MLflow admins may set or delete `champion`, on every dev model (the
shared one and each tenant's); a later environment's, only its own identity (below). EDIT
users keep registering versions and moving other aliases (`challenger`), so a data
scientist can propose a model but never serve it.

And one rule per environment (dev -> staging -> prod, one registered model each): a later
environment's registered models, `<MODEL_NAME>-staging` / `-prod` and their tenants'
`.<tenant>` models, change (create, new version, tags, aliases, delete) only through that
environment's own identity (access.IDENTITY: `flows-staging`, `flows-prod`) or an admin.
Dev's `flows` keeps EDIT on every model for basic-auth (dev's tenants' models have no names
in advance), so without this rule a dev credential could move a prod alias; with it, 403.
MODEL_NAME (default churn-classifier) is read from the server's environment.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, Response, g, request
from mlflow.server import app as mlflow_app
from mlflow.server.auth import create_app as basic_auth_app
from mlflow.server.auth import sender_is_admin

from common.registry import CHAMPION, TENANT_SEPARATOR
from common.registry.access import IDENTITY

MOVERS_ENV = "MLOPS_CHAMPION_MOVERS"
DEFAULT_MOVERS = (IDENTITY["dev"],)
MODEL_BASE_ENV = "MODEL_NAME"
DEFAULT_MODEL_BASE = "churn-classifier"
REGISTRY_WRITES = {
    "/mlflow/registered-models/" + op
    for op in ("create", "rename", "update", "delete", "set-tag", "delete-tag", "alias")
} | {
    "/mlflow/model-versions/" + op
    for op in ("create", "update", "delete", "set-tag", "delete-tag", "transition-stage")
}
"""The registry endpoints that change something, under /api/2.0 or /ajax-api/2.0; each
names its registered model in `name`."""
ALIAS_PATH = "/mlflow/registered-models/alias"
"""SetRegisteredModelAlias (POST) and DeleteRegisteredModelAlias (DELETE), under /api/2.0
or /ajax-api/2.0 (the UI's)."""


def champion_movers() -> frozenset[str]:
    """The usernames that may move `champion` besides admins."""
    raw = os.environ.get(MOVERS_ENV)
    names = DEFAULT_MOVERS if raw is None else tuple(n.strip() for n in raw.split(","))
    return frozenset(n for n in names if n)


def _param(key: str) -> str | None:
    if request.method in ("POST", "PATCH") or request.is_json:
        body: Any = request.get_json(silent=True)
        if isinstance(body, dict) and key in body:
            return str(body[key])
        return None
    return request.args.get(key)


def _requested_alias() -> str | None:
    return _param("alias")


def environment_of(name: str, base: str | None = None) -> str | None:
    """The later environment (staging, prod) whose registered model `name` is; None: dev's
    or another model."""
    base = base or os.environ.get(MODEL_BASE_ENV) or DEFAULT_MODEL_BASE
    for env in IDENTITY:
        if env == "dev":
            continue
        own = f"{base}-{env}"
        if name == own or name.startswith(own + TENANT_SEPARATOR):
            return env
    return None


def _guard_environments() -> Response | None:
    """A later environment's models change only through its own identity or an admin."""
    if request.method == "GET" or not request.path.endswith(tuple(REGISTRY_WRITES)):
        return None
    name = _param("name")
    env = environment_of(name) if name else None
    if env is None:
        return None
    user = getattr(g, "mlflow_authenticated_user", None)
    if user == IDENTITY[env] or sender_is_admin():  # type: ignore[no-untyped-call]
        return None
    return Response(
        f"Permission denied: {name} is the {env} environment's; only {IDENTITY[env]} or an "
        f"admin may change it (promote with python -m flows.promote promote --to {env}).",
        status=403,
        mimetype="text/plain",
    )


def _guard_champion() -> Response | None:
    """Runs after basic-auth's own check (which already demanded EDIT on the model)."""
    if request.method not in ("POST", "DELETE") or not request.path.endswith(ALIAS_PATH):
        return None
    if _requested_alias() != CHAMPION:
        return None
    name = _param("name")
    if name and environment_of(name) is not None:
        return None  # a later environment's model: _guard_environments let only its own through
    user = getattr(g, "mlflow_authenticated_user", None)
    if user in champion_movers() or sender_is_admin():  # type: ignore[no-untyped-call]
        return None
    return Response(
        f"Permission denied: only {', '.join(sorted(champion_movers()))} or an admin may "
        f"move the {CHAMPION!r} alias ({MOVERS_ENV}); promote through the gate.",
        status=403,
        mimetype="text/plain",
    )


def create_app(app: Flask = mlflow_app) -> Any:
    """MLflow's basic-auth app with the environment and champion rules after its own check."""
    wrapped = basic_auth_app(app)
    app.before_request(_guard_environments)
    app.before_request(_guard_champion)
    return wrapped
