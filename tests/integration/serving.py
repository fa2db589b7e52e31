"""A real `bentoml serve` of the predictor on a model copied from the pipeline's champion.

Shared by the predictor's integration tests; each module registers its own model name so
that modules of one session do not move each other's aliases. The service logs in to its
database as `mlops_predictor` (`predictor_database`), so row-level security holds as in
production, and every request carries a tenant's key (`api_key`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow.tracking import MlflowClient

from common.localpg import LocalPostgres
from common.store import migrate, roles, tenants
from tests.servers import VENV_BIN, Server, clean_env, free_port, http_ok, run_ok
from tests.workspace import ROOT


def register_copies(tracking_uri: str, name: str, versions: int = 2) -> MlflowClient:
    """`name` v1..vN, each the artifacts of the pipeline's champion; champion -> v1."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    source = client.get_model_version_by_alias("churn-classifier", "champion")
    client.create_registered_model(name)
    assert source.source is not None
    for _ in range(versions):
        client.create_model_version(
            name,
            source.source,
            source.run_id,
            source.tags,
            model_id=source.source[len("models:/") :],
        )
    client.set_registered_model_alias(name, "champion", "1")
    return client


@contextmanager
def serve_predictor(home: Path, env: dict[str, str]) -> Iterator[str]:
    """Bundle the champion, start `bentoml serve` with `env` on a free port; yield its URL."""
    full = clean_env(
        MLOPS_HOME=str(home / ".mlops"),
        BENTOML_HOME=str(home / "bentoml"),
        OMP_NUM_THREADS="1",
        **env,
    )
    bundle = [str(VENV_BIN / "python"), "-m", "services.predictor.package"]
    run_ok(bundle, cwd=ROOT, env=full)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(VENV_BIN / "bentoml"), "serve", "services.predictor.service:Predictor"]
    server = Server(
        "bentoml serve",
        [*cmd, "--port", str(port), "--host", "127.0.0.1"],
        log_path=home / "bentoml.log",
        healthy=http_ok(f"{url}/readyz"),
        env=full,
        cwd=ROOT,
    )
    with server.start():
        yield url


def predictor_database(pg: LocalPostgres, database: str = "predictions") -> tuple[str, str]:
    """`database` migrated by its owner; (the owner's URL, the predictor role's URL)."""
    admin = pg.url(database)
    migrate(admin)
    roles.enable_login(admin, roles.PREDICTOR)  # the throwaway cluster trusts local logins
    return admin, roles.role_url(admin, roles.PREDICTOR)


def api_key(
    admin_url: str,
    tenant: str = tenants.DEFAULT_TENANT,
    scopes: tuple[str, ...] = tenants.SCOPES,
) -> str:
    """A new key of `tenant` (added if missing) with `scopes`: the whole key."""
    if tenant not in {t.id for t in tenants.list_tenants(admin_url)}:
        tenants.add_tenant(admin_url, tenant)
    return tenants.create_key(admin_url, tenant, scopes).secret


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}
