"""`ops db-upgrade`: back up MLflow's database, then migrate it to this MLflow's schema."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from scripts.ops.target import Target, dump
from scripts.ops.tools import run


def db_upgrade(target: Target, backups: Path) -> None:
    """Back up MLflow's database, then `mlflow db upgrade` it as its owner."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = backups / f"mlflow-before-upgrade-{stamp}.dump"
    out.parent.mkdir(parents=True, exist_ok=True)
    dump(target, "mlflow", out)
    print(f"backup of the mlflow database: {out}")
    url, env = target.libpq("mlflow")
    url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    if owner := target.owner("mlflow"):  # new tables must be the mlflow role's, not ours
        url += ("&" if "?" in url else "?") + "options=" + quote(f"-c role={owner}")
    with target.clients_stopped(("mlflow",)):  # its only client; the rest speak HTTP to it
        run(
            [str(Path(sys.executable).parent / "mlflow"), "db", "upgrade", url],
            "mlflow db upgrade",
            env,
        )
    print("mlflow db upgrade: the schema is at this MLflow's head")
