"""Labelled production rows as training data: from the prediction log into the DVC project.

The retrain flow trains on the raw table plus the logged predictions whose true label has
arrived. `export` writes those rows to `data.production_dir` (which `prepare` appends) and
tracks the file with `dvc add`, so the new version's lineage names the data it saw.

Whose rows: only those of `data.production_tenants`, read under their scope. For the
shared model that is the tenants who consented (params.yaml `data.production_tenants`);
for a tenant's own model (`Params.for_tenant`) it is that tenant alone. No tenant's labels
reach another customer's model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import dvc_pipeline, registry
from common.localpg import has_prediction_db, prediction_db
from common.params import DataParams
from common.settings import Settings
from common.store import monitoring, roles

PRODUCTION_FILE = "labelled.parquet"


@dataclass(frozen=True)
class Export:
    """How many rows went where; `note` says so, or why there were none."""

    rows: int
    path: Path | None
    note: str


def export(
    root: Path, data: DataParams, settings: Settings, on_line: Callable[[str], None]
) -> Export:
    """Write the labelled rows of `data.production_tenants` under `root` and `dvc add` them.

    The rows are those the shared model or these tenants' own models served. No export (0
    rows) without `data.production_dir`, without a tenant in `data.production_tenants`,
    without a prediction log (no DATABASE_URL and no embedded one made yet) or without a
    labelled row. `dvc add`'s output goes to `on_line`.
    """
    if not data.production_dir:
        return Export(0, None, "data.production_dir is not set: training on the raw table only")
    tenants = data.production_tenants
    if not tenants:
        return Export(0, None, "data.production_tenants is empty: training on the raw table only")
    if not has_prediction_db(settings):
        return Export(
            0, None, "no prediction log (DATABASE_URL unset, no embedded one): raw table only"
        )
    models = [registry.model_name(settings), *(registry.model_name(settings, t) for t in tenants)]
    with prediction_db(settings, reuse_running=True, role=roles.FLOWS) as database_url:
        rows = monitoring.labelled_rows(database_url, models, data, tenants=tenants)
    whose = ", ".join(tenants)
    if rows.empty:
        return Export(
            0, None, f"no labelled production rows of {whose} yet: training on the raw table only"
        )
    path = root / data.production_dir / PRODUCTION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    rows.to_parquet(path, index=False)
    relative = path.relative_to(root)
    dvc_pipeline.run((*dvc_pipeline.DVC, "add", "--quiet", str(relative)), root, on_line)
    return Export(len(rows), path, f"{len(rows)} labelled production rows of {whose} -> {relative}")
