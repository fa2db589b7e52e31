"""Serve the champion, send a few holdout records and their labels, print the answers.

The requests carry a key of the default tenant, made for the run (`demo_key`) and revoked
after it.
"""

from __future__ import annotations

import argparse
import json
import math
import urllib.request
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

from common import paths
from common.errors import run_cli
from common.localpg import EMBEDDED_PG_PORT, LocalPostgres, embedded_database
from common.params import load_params
from common.settings import Settings, get_settings
from common.store import tenants
from services.predictor.launch import serving


def _call(url: str, key: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """POST `body` (GET without one) with the key; the JSON answer."""
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return dict(json.loads(resp.read()))


def admin_url(settings: Settings) -> str:
    """The prediction database as its owner: DATABASE_URL, else this environment's database
    in the embedded cluster."""
    if settings.database_url:
        return settings.database_url
    pg = LocalPostgres(settings.mlops_home / "postgres", port=EMBEDDED_PG_PORT)
    return pg.url(embedded_database(settings.mlops_env))


def demo_key(database_url: str) -> tenants.NewKey:
    """A new key of the default tenant with every scope (the demo also reads GET /model)."""
    return tenants.create_key(database_url, tenants.DEFAULT_TENANT, tenants.SCOPES)


def sample_records(n: int) -> tuple[list[dict[str, Any]], list[Any]]:
    """n holdout rows as JSON records (missing values as null) with their true labels."""
    data = load_params().data
    rows = pd.read_parquet(paths.HOLDOUT).head(n)
    records = [
        {str(k): (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        for row in rows[data.feature_names].astype(object).to_dict(orient="records")
    ]
    return records, rows[data.target].tolist()


def show_answers(url: str, key: str, n: int = 3) -> None:
    """Send n holdout records, their true labels as feedback, and print the answers."""
    records, labels = sample_records(n)
    answer = _call(f"{url}/predict", key, {"records": records})
    for pred, label in zip(answer["predictions"], labels, strict=True):
        _call(f"{url}/feedback", key, {"request_id": pred["request_id"], "label": str(label)})
    model = _call(f"{url}/model/", key)
    table = Table(
        title=f"Predictions from {answer['model_name']} v{answer['model_version']} "
        f"for tenant {answer['tenant_id']}"
    )
    for col in ("request id", "predicted", "P(churn)", "true label (sent as feedback)"):
        table.add_column(col)
    for pred, label in zip(answer["predictions"], labels, strict=True):
        probs = pred["probabilities"]
        table.add_row(
            pred["request_id"][:8], pred["predicted_class"], f"{probs.get('1', 0):.3f}", str(label)
        )
    console = Console()
    console.print(table)
    console.print(
        f"served through {model['backend']}; the prediction log holds these rows and labels."
    )
    console.print(
        "Serve it yourself: make serve; KEY=$(uv run mlops tenants keys create default "
        '--scope predict --scope feedback --scope admin); curl -sL -H "Authorization: Bearer '
        '$KEY" http://127.0.0.1:3000/model',
        highlight=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args()
    settings = get_settings()
    with serving(settings, args.port):
        key = demo_key(admin_url(settings))
        try:
            show_answers(f"http://127.0.0.1:{args.port}", key.secret)
        finally:
            tenants.revoke_key(admin_url(settings), key.tenant_id, key.key_id)


if __name__ == "__main__":
    run_cli(main)
