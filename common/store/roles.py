"""The PostgreSQL roles services log in as, and the URLs that log in as them.

The migrations create the roles (without LOGIN when missing) and grant each only what it
needs; row-level security then limits every one of them to the tenants its transaction
names. Compose's initdb and `make up` create them first, with LOGIN and a password each.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit

from psycopg import sql

from common.store.connection import connect

PREDICTOR = "mlops_predictor"
"""The predictor: inserts and reads its tenants' predictions and labels."""
FLOWS = "mlops_flows"
"""The Prefect flows: read the log, log batch predictions, write monitoring results."""
GRAFANA = "mlops_grafana"
"""Grafana: reads the shared model's monitoring numbers, nothing else."""
WORKER = "mlops_worker"
"""The job workers: read the request queues granted them, write results and predictions."""
SERVICE_ROLES = (PREDICTOR, FLOWS, GRAFANA, WORKER)


def role_url(database_url: str, role: str, password: str | None = None) -> str:
    """`database_url` logging in as `role` (with `password`, or none: trust or a .pgpass)."""
    parts = urlsplit(database_url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address goes back in brackets
        host = f"[{host}]"
    if parts.port:
        host = f"{host}:{parts.port}"
    user = quote(role, safe="")
    if password:
        user += ":" + quote(password, safe="")
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


def enable_login(admin_url: str, role: str, password: str | None = None) -> None:
    """Let `role` log in (with `password` if given); run as a role that may alter it."""
    statement = sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(role))
    if password is not None:
        statement = sql.SQL("{} PASSWORD {}").format(statement, sql.Literal(password))
    with connect(admin_url, application_name="mlops-admin") as conn:
        conn.execute(statement)
