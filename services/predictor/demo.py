"""Serve the champion, send a few holdout records and their labels, print the answers."""

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
from common.params import load_params
from common.settings import get_settings
from services.predictor.launch import serving


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return dict(json.loads(resp.read()))


def sample_records(n: int) -> tuple[list[dict[str, Any]], list[Any]]:
    """n holdout rows as JSON records (missing values as null) with their true labels."""
    data = load_params().data
    rows = pd.read_parquet(paths.HOLDOUT).head(n)
    records = [
        {str(k): (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        for row in rows[data.feature_names].astype(object).to_dict(orient="records")
    ]
    return records, rows[data.target].tolist()


def show_answers(url: str, n: int = 3) -> None:
    """Send n holdout records, their true labels as feedback, and print the answers."""
    records, labels = sample_records(n)
    answer = _post(f"{url}/predict", {"records": records})
    for pred, label in zip(answer["predictions"], labels, strict=True):
        _post(f"{url}/feedback", {"request_id": pred["request_id"], "label": str(label)})
    with urllib.request.urlopen(f"{url}/model/", timeout=30) as resp:
        model = json.loads(resp.read())
    table = Table(title=f"Predictions from {answer['model_name']} v{answer['model_version']}")
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
        "Serve it yourself: make serve, then curl -sL http://127.0.0.1:3000/model",
        highlight=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args()
    with serving(get_settings(), args.port):
        show_answers(f"http://127.0.0.1:{args.port}")


if __name__ == "__main__":
    run_cli(main)
