"""The MLflow server's auth app: MLflow's basic-auth, plus the one rule it lacks.

`mlflow server --app-name mlops-auth` (pyproject's `mlflow.app` entry point) runs the
basic-auth app unchanged (users, grants, the admin from MLFLOW_AUTH_CONFIG_PATH), then
checks one thing basic-auth cannot express: grants are per registered model, never per
alias, so anyone with EDIT on a model could point its `champion` alias at any version.
Here only the promotion identities (MLOPS_CHAMPION_MOVERS, comma-separated usernames;
`flows` unless set) and MLflow admins may set or delete `champion`, on every model (the
shared one and each tenant's). EDIT users keep registering versions and moving other
aliases (`challenger`), so a data scientist can propose a model but never serve it.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, Response, g, request
from mlflow.server import app as mlflow_app
from mlflow.server.auth import create_app as basic_auth_app
from mlflow.server.auth import sender_is_admin

from common.registry import CHAMPION

MOVERS_ENV = "MLOPS_CHAMPION_MOVERS"
DEFAULT_MOVERS = ("flows",)
ALIAS_PATH = "/mlflow/registered-models/alias"
"""SetRegisteredModelAlias (POST) and DeleteRegisteredModelAlias (DELETE), under /api/2.0
or /ajax-api/2.0 (the UI's)."""


def champion_movers() -> frozenset[str]:
    """The usernames that may move `champion` besides admins."""
    raw = os.environ.get(MOVERS_ENV)
    names = DEFAULT_MOVERS if raw is None else tuple(n.strip() for n in raw.split(","))
    return frozenset(n for n in names if n)


def _requested_alias() -> str | None:
    if request.method == "POST" or request.is_json:
        body: Any = request.get_json(silent=True)
        return str(body.get("alias")) if isinstance(body, dict) else None
    return request.args.get("alias")


def _guard_champion() -> Response | None:
    """Runs after basic-auth's own check (which already demanded EDIT on the model)."""
    if request.method not in ("POST", "DELETE") or not request.path.endswith(ALIAS_PATH):
        return None
    if _requested_alias() != CHAMPION:
        return None
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
    """MLflow's basic-auth app with the champion rule after its own check."""
    wrapped = basic_auth_app(app)
    app.before_request(_guard_champion)
    return wrapped
