"""The table `make demo` ends with: what the pipeline registered, its metrics, where to look.

One table for the shared model, then one for each tenant's own model the pipeline made.
The version it names must be in the registry these settings talk to (a report left by a
run against another registry is an error, not a result), and with `--since` (the time the
pipeline run began) a version registered before it is told as unchanged, not as promoted.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common import dvc_pipeline, paths, registry, registry_target
from common.errors import UserError, run_cli
from common.params import load_params
from common.settings import Settings, get_settings


def render(settings: Settings, tenant: str | None = None, since: float | None = None) -> Table:
    """The last register decision of the shared model (None) or of `tenant`'s own;
    `since` (epoch seconds): a decision written before it is an earlier run's."""
    where = paths.layout(tenant)
    if not where.REGISTER_REPORT.exists():
        raise UserError(
            f"{where.REGISTER_REPORT} not found: run `dvc repro` (or `make demo`) first."
        )
    decided_at = where.REGISTER_REPORT.stat().st_mtime
    now = since is None or decided_at >= since
    s = dvc_pipeline.summary(Path(), tenant, registered_now=now)
    metrics = json.loads(where.METRICS.read_text())
    dvc_pipeline.check_in_registry(s, settings)
    client = registry.connect(settings)
    target = registry_target.current(settings).describe()
    name = s.model_name
    aliases = {
        alias: (mv.version if mv else "-")
        for alias in (registry.CHAMPION, registry.CHALLENGER)
        for mv in [registry.version_by_alias(client, name, alias)]
    }
    whose = f" (tenant {tenant}'s own model)" if tenant else ""
    table = Table(title=f"Pipeline result: {name}{whose}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model version", f"v{s.version}")
    when = datetime.fromtimestamp(decided_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    if now:
        gate = ("promoted: " if s.promoted else "not promoted: ") + s.reason
    else:
        gate = f"unchanged since {when}: nothing to retrain, no new version"
    table.add_row("gate", gate)
    table.add_row("registered", f"{when}, {s.registry or target}")
    table.add_row(
        "aliases",
        ", ".join(f"{a} -> v{v}" if v != "-" else f"{a} -> none" for a, v in aliases.items()),
    )
    for key in ("accuracy", "f1_macro", "roc_auc", "log_loss"):
        table.add_row(f"holdout {key}", f"{metrics[key]:.4f}")
    table.add_row("tracking store", settings.tracking_uri)
    return table


def where_to_look(settings: Settings) -> list[str]:
    if settings.embedded:
        ui = (
            "make mlflow-ui, then http://127.0.0.1:5000 "
            f"(= mlflow ui --backend-store-uri {settings.tracking_uri} --workers 1)"
        )
    else:
        ui = settings.tracking_uri
    return [
        f"MLflow runs and registry:  {ui}",
        "Metrics and plots:         .venv/bin/dvc metrics show; .venv/bin/dvc plots show",
        f"Validation report:         {paths.VALIDATION_REPORT}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description="the summary table of the last pipeline run")
    parser.add_argument(
        "--since",
        type=float,
        help="when this pipeline run began (epoch seconds): an older decision is told as unchanged",
    )
    since = parser.parse_args().since
    settings = get_settings()
    console = Console()
    console.print(render(settings, since=since))
    for tenant in load_params().tenants:
        if paths.layout(tenant).REGISTER_REPORT.exists():
            console.print(render(settings, tenant, since))
    for line in where_to_look(settings):
        console.print(line, highlight=False, soft_wrap=True)


if __name__ == "__main__":
    run_cli(main)
