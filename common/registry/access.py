"""Who may do what on the MLflow server: the service users of its basic-auth app.

The server (`mlflow server --app-name basic-auth`) refuses anonymous requests, creates its
admin from MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD on first start, and
gives users without a grant nothing (`default_permission = NO_PERMISSIONS`, auth_config()).
`python -m common.registry.access` (compose's `mlflow-init` job; `make up` calls
ensure_service_users) signs in as that admin and makes each service user exist with the
password its environment names (changed there, changed here) and with its grants:

- `flows`, the Prefect worker's identity (pipeline, register, promote, rollback, monitor,
  retrain): EDIT on every experiment and registered model. It creates the ones it uses
  (MLflow then gives it MANAGE on them). It is the promotion identity.
- `predictor`: READ on every registered model (alias, version, tags) and experiment (the
  version's files come through the server's artifact proxy, which checks the experiment).
  It cannot move an alias, tag a version, or delete anything.
- `flows-staging`, `flows-prod`: the promotion identity of each later environment (set
  MLFLOW_FLOWS_STAGING_PASSWORD / MLFLOW_FLOWS_PROD_PASSWORD to make them; unset, the
  environment has no identity yet and is skipped). READ on every registered model and
  experiment (to copy the version before theirs) and EDIT on their own environment's
  registered model (`<MODEL_NAME>-<env>`); what they create (that model, its tenants'
  `.<tenant>` models, their `<MLFLOW_EXPERIMENT_NAME>-<env>` experiment) MLflow makes
  theirs (MANAGE). So a staging credential moves nothing in prod.

What basic-auth does not enforce: grants are per experiment and per registered model, never
per alias, so EDIT would move `champion` as well as `challenger`; and `flows` keeps EDIT on
every model (dev's tenants' models have names nobody knows in advance), which would reach
prod's. The server runs it as `--app-name mlops-auth` (common.registry.server_auth), which
adds that only a promotion identity (or an admin) may move `champion`, and that only an
environment's own identity (or an admin) may change anything of a later environment's
registered models (`<MODEL_NAME>-staging[.<tenant>]`, `-prod`). The predictor, and anyone
the admin adds without a grant, can move no alias at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.utils.rest_utils import MlflowHostCreds, http_request, verify_rest_response
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.errors import UserError, run_cli
from common.settings import Environment, Settings

DEFAULT_PERMISSION = "NO_PERMISSIONS"
"""What a signed-in user may do where nobody granted it anything: nothing."""

MIN_PASSWORD = 12
"""MLflow's basic-auth refuses shorter passwords."""

AUTH_CACHE_SECONDS = 60
"""How long a server worker trusts a password it checked. Each check is a scrypt hash
(measured: 0.5 s of CPU here, 1.4 s a request on a busy 2-core machine), and the predictor
and every flow call the server many times; so a changed password or removed user is honoured
by the other workers up to this long after (the worker that made the change at once)."""


@dataclass(frozen=True)
class ServiceUser:
    """One service's MLflow identity: its name, the variable holding its password, grants."""

    name: str
    password_env: str
    grants: tuple[tuple[str, str], ...]
    """(resource type, permission) pairs, each granted on every resource of the type."""
    env: Environment | None = None
    """The environment whose promotion identity this is (EDIT on its registered model);
    None: a service of every environment. Such a user is optional: no password, no user."""


FLOWS = ServiceUser(
    "flows", "MLFLOW_FLOWS_PASSWORD", (("experiment", "EDIT"), ("registered_model", "EDIT"))
)
PREDICTOR = ServiceUser(
    "predictor",
    "MLFLOW_PREDICTOR_PASSWORD",
    (("experiment", "READ"), ("registered_model", "READ")),
)
FLOWS_STAGING = ServiceUser(
    "flows-staging",
    "MLFLOW_FLOWS_STAGING_PASSWORD",
    (("experiment", "READ"), ("registered_model", "READ")),
    env="staging",
)
FLOWS_PROD = ServiceUser(
    "flows-prod",
    "MLFLOW_FLOWS_PROD_PASSWORD",
    (("experiment", "READ"), ("registered_model", "READ")),
    env="prod",
)
SERVICE_USERS = (FLOWS, PREDICTOR)
"""The users every stack has (their passwords are required)."""
ENVIRONMENT_USERS = (FLOWS_STAGING, FLOWS_PROD)
"""Later environments' promotion identities, made when their password is set."""
IDENTITY: dict[str, str] = {"dev": FLOWS.name} | {u.env: u.name for u in ENVIRONMENT_USERS if u.env}
"""Each environment's promotion identity: the only user (besides admins) that may change
a later environment's registered models (common.registry.server_auth)."""


def auth_config(database_uri: str, admin_username: str = "admin") -> str:
    """The basic-auth app's config file (MLFLOW_AUTH_CONFIG_PATH) for its user database.

    `database_uri` names no password: the server's PGPASSWORD reaches libpq instead, so the
    file holds no secret (and the admin's password comes from MLFLOW_AUTH_ADMIN_PASSWORD).
    """
    return (
        "# MLflow's basic-auth app (mlflow server --app-name basic-auth). Written by\n"
        "# common.registry.access.auth_config; secrets come from the environment.\n"
        "[mlflow]\n"
        f"default_permission = {DEFAULT_PERMISSION}\n"
        f"database_uri = {database_uri}\n"
        f"admin_username = {admin_username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        f"auth_cache_ttl_seconds = {AUTH_CACHE_SECONDS}\n"
    )


class _Admin:
    """The few auth endpoints needed, called with explicit admin credentials."""

    def __init__(self, tracking_uri: str, username: str, password: str) -> None:
        # Imported here: mlflow.server.auth.routes loads the whole server (and its warnings).
        from mlflow.server.auth import routes  # noqa: PLC0415

        self.routes = routes
        self.creds = MlflowHostCreds(  # type: ignore[no-untyped-call]
            tracking_uri.rstrip("/"), username=username, password=password
        )

    def call(self, endpoint: str, method: str, **kwargs: Any) -> Any:
        resp = http_request(  # type: ignore[no-untyped-call]
            self.creds, endpoint, method, max_retries=2, **kwargs
        )
        return verify_rest_response(resp, endpoint)

    def has_user(self, name: str) -> bool:
        try:
            self.call(self.routes.GET_USER, "GET", params={"username": name})
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    def grant(self, name: str, resource_type: str, permission: str, resource_id: str = "*") -> None:
        """`permission` on `resource_id` (default: every resource of the type); an older
        grant there is replaced."""
        body = {"username": name, "resource_type": resource_type, "resource_id": resource_id}
        try:
            self.call(
                self.routes.GRANT_USER_PERMISSION, "POST", json={**body, "permission": permission}
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            self.call(self.routes.REVOKE_USER_PERMISSION, "POST", json=body)
            self.call(
                self.routes.GRANT_USER_PERMISSION, "POST", json={**body, "permission": permission}
            )


def ensure_service_users(
    tracking_uri: str,
    admin: tuple[str, str],
    passwords: Mapping[str, str],
    model_base: str = Settings.model_fields["model_base"].default,
) -> list[str]:
    """Create or update each service user (password, grants); the names, in order.

    `admin` is (username, password); `passwords` maps each ServiceUser.password_env to its
    value. A missing or short password is a UserError naming the variable; an environment's
    identity (ENVIRONMENT_USERS) is made only when its password is there. `model_base` is
    MODEL_NAME, whose `-<env>` model each environment's identity may edit.
    """
    users = [*SERVICE_USERS, *(u for u in ENVIRONMENT_USERS if passwords.get(u.password_env))]
    for user in users:
        if len(passwords.get(user.password_env) or "") < MIN_PASSWORD:
            raise UserError(f"{user.password_env} must be set, {MIN_PASSWORD} characters or more")
    client = _Admin(tracking_uri, *admin)
    try:
        for user in users:
            body = {"username": user.name, "password": passwords[user.password_env]}
            if client.has_user(user.name):
                client.call(client.routes.UPDATE_USER_PASSWORD, "PATCH", json=body)
            else:
                client.call(client.routes.CREATE_USER, "POST", json=body)
            for resource_type, permission in user.grants:
                client.grant(user.name, resource_type, permission)
            if user.env is not None:
                own = Settings.model_construct(model_base=model_base).model_name_in(user.env)
                client.grant(user.name, "registered_model", "EDIT", own)
    except MlflowException as exc:
        raise UserError(f"MLflow at {tracking_uri} refused the admin's request: {exc}") from exc
    return [user.name for user in users]


class _InitSettings(BaseSettings):
    """The init job's environment. Not in common.settings: no service should read these."""

    model_config = SettingsConfigDict(extra="ignore")

    tracking_uri: str = Field(alias="MLFLOW_TRACKING_URI")
    admin_username: str = Field(alias="MLFLOW_TRACKING_USERNAME", min_length=1)
    admin_password: SecretStr = Field(alias="MLFLOW_TRACKING_PASSWORD", min_length=1)
    flows_password: SecretStr = Field(alias=FLOWS.password_env, min_length=MIN_PASSWORD)
    predictor_password: SecretStr = Field(alias=PREDICTOR.password_env, min_length=MIN_PASSWORD)
    staging_password: SecretStr | None = Field(default=None, alias=FLOWS_STAGING.password_env)
    prod_password: SecretStr | None = Field(default=None, alias=FLOWS_PROD.password_env)
    model_base: str = Field(default="churn-classifier", alias="MODEL_NAME")


def _secret(value: SecretStr | None) -> str:
    return value.get_secret_value() if value is not None else ""


def main() -> None:
    try:
        env = _InitSettings()
    except ValidationError as exc:
        names = ", ".join(str(e["loc"][0]) for e in exc.errors())
        raise UserError(f"set {names} (MLflow users need them; none has a default)") from exc
    users = ensure_service_users(
        env.tracking_uri,
        (env.admin_username, env.admin_password.get_secret_value()),
        {
            FLOWS.password_env: env.flows_password.get_secret_value(),
            PREDICTOR.password_env: env.predictor_password.get_secret_value(),
            FLOWS_STAGING.password_env: _secret(env.staging_password),
            FLOWS_PROD.password_env: _secret(env.prod_password),
        },
        env.model_base,
    )
    print(f"MLflow users ready at {env.tracking_uri}: {', '.join(users)}")


if __name__ == "__main__":
    run_cli(main)
