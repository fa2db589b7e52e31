"""The Evidently workspace: monitoring snapshots kept per model and charted over time.

The target (settings.evidently_target) is a directory, Evidently's local Workspace that
`evidently ui --workspace DIR` serves, or the http(s) URL of a running `evidently ui`,
reached through its RemoteWorkspace. Each monitored model, and each tenant's traffic, has
one project, created on first use with a dashboard of the headline numbers; each window
adds its snapshots, one pair per variant live in it (champion, challenger, shadow), each
carrying its variant in its tags (a challenger's and shadow's, models.report.snapshot_tags),
metadata (`variant`) and name; the dashboard charts each variant's numbers in panels of
their own, the champion's beside the challenger's.
A UI started with EVIDENTLY_SECRET refuses writes without it: uploads send settings'
EVIDENTLY_SECRET (or the `secret` given) in its `evidently-secret` header.

A directory may be served by a running `evidently ui` while a monitor run writes to it:
every file this module writes there appears whole, by a rename (see _RenamedInLocation).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from evidently.sdk.models import (  # type: ignore[import-untyped]
    DashboardPanelPlot,
    DashboardTabModel,
    PanelMetric,
)
from evidently.sdk.panels import bar_plot_panel, line_plot_panel  # type: ignore[import-untyped]
from evidently.ui.service.storage.fslocation import (  # type: ignore[import-untyped]
    FSLocation,
)
from evidently.ui.workspace import RemoteWorkspace, Workspace  # type: ignore[import-untyped]

from common.params import MonitorParams
from common.settings import get_settings
from models.report import (
    DEFAULT_VARIANT,
    DRIFT_TAG,
    PART_KEY,
    PERFORMANCE_TAG,
    snapshot_tags,
)

OTHER_VARIANTS = ("challenger", "shadow")
"""The variants besides the champion (predictions.variant) that get panels of their own."""


def project_name(model_name: str, tenant: str | None = None) -> str:
    """One project per monitored model, and per tenant: a tenant's charts show its traffic only."""
    return f"{model_name} monitoring" + ("" if tenant is None else f" (tenant {tenant})")


DASHBOARD_TAB = "Monitoring"
"""Evidently OSS refuses a dashboard with more than one tab: every panel goes in this one."""


def add_snapshot(
    target: str,
    project_name: str,
    *snapshots: Any,
    description: str | None = None,
    prediction_columns: Sequence[str] | None = None,
    secret: str | None = None,
) -> str:
    """Add one window's snapshots to the project `project_name`; return the project's id.

    `snapshots` are Evidently snapshots or objects holding them in `.snapshots` (such as
    models.report.MonitorReport). The project and its dashboard are created on first
    use and reused after; `prediction_columns` (default: MonitorParams' prediction and
    probability columns) are the columns whose drift score the dashboard charts.
    `description` names the runs; `secret` is the UI's write secret (open_workspace).
    """
    runs = list(_flatten(snapshots))
    if not runs:
        raise ValueError("add_snapshot needs at least one snapshot")
    workspace = open_workspace(target, secret)
    project = ensure_project(workspace, project_name, prediction_columns)
    for run in runs:
        workspace.add_run(project.id, run, name=_run_name(run, description))
    return str(project.id)


def open_workspace(target: str, secret: str | None = None) -> Any:
    """RemoteWorkspace for an http(s) URL (checks it answers), else the local directory.

    A URL's writes carry `secret`, by default settings' EVIDENTLY_SECRET (none if unset).
    """
    if target.startswith(("http://", "https://")):
        if secret is None and (configured := get_settings().evidently_secret) is not None:
            secret = configured.get_secret_value() or None
        return RemoteWorkspace(target.rstrip("/"), secret=secret)
    path = Path(target).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    workspace = Workspace(str(path))
    # Evidently's local Workspace writes every file (project metadata.json, dashboard.json,
    # snapshots) through this one object; swapped, each file is renamed in whole.
    workspace.state.location = _RenamedInLocation(str(path))
    return workspace


class _RenamedInLocation(FSLocation):  # type: ignore[misc]
    """A workspace directory whose files appear whole: written beside it, then renamed in.

    `evidently ui` (0.7) watches its directory (watchdog) and reads a project's
    metadata.json on the file's create event, before a plain write has ended; the
    JSONDecodeError of the half-written file is not caught and ends the watcher thread, so
    nothing written later reaches the UI until it restarts. Rewriting or moving the file
    again afterwards (tried first) comes too late: the watcher is already dead. A rename
    within the watched tree does not help either: the handler looks only at a move's source
    path. A rename from outside the tree is one create event for the complete file.
    """

    @contextlib.contextmanager
    def open(self, path: str, mode: str = "r") -> Iterator[IO[Any]]:
        target = Path(self._resolve_path(path))
        staging = Path(self.path).parent  # beside the workspace: outside the watched tree
        if "w" not in mode or not _same_filesystem(staging, target.parent):
            with super().open(path, mode) as f:  # reads; or no rename possible: as Evidently
                yield f
            return
        tmp = staging / f".{target.name}.{secrets.token_hex(8)}.tmp"
        # os.open, not mkstemp: the file keeps the umask's mode (0644), readable by the UI
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, mode) as f:
                yield f
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _same_filesystem(a: Path, b: Path) -> bool:
    """Whether a file in `a` can be renamed into `b` (same device, `a` writable)."""
    try:
        return a.stat().st_dev == b.stat().st_dev and os.access(a, os.W_OK)
    except OSError:
        return False


def ensure_project(
    workspace: Any, name: str, prediction_columns: Sequence[str] | None = None
) -> Any:
    """The project named `name` (created if missing) with every dashboard panel in place.

    Panels are matched by title, so a second call adds nothing, and a panel added or
    changed in this module later reaches existing projects (a changed one keeps its id).
    """
    found = [p for p in workspace.search_project(name) if p.name == name]
    if found:
        project = found[0]
    else:
        about = "Drift, data quality and performance of the served model's traffic."
        project = workspace.create_project(name, description=about)
    if prediction_columns is None:
        defaults = MonitorParams()
        prediction_columns = (defaults.prediction_column, defaults.probability_column)
    dashboard = workspace.get_dashboard(project.id)
    wanted = {p.title: p for p in dashboard_panels(prediction_columns)}
    changed = False
    for i, panel in enumerate(dashboard.panels):
        want = wanted.get(panel.title)
        if want is not None and (panel.values, panel.size) != (want.values, want.size):
            dashboard.panels[i] = want.copy(update={"id": panel.id})
            changed = True
    have = {p.title for p in dashboard.panels}
    missing = [p for p in wanted.values() if p.title not in have]
    if missing:
        if not dashboard.tabs:
            dashboard.tabs.append(DashboardTabModel(title=DASHBOARD_TAB, panels=[]))
        dashboard.panels.extend(missing)
        dashboard.tabs[0].panels.extend(p.id for p in missing)
    if missing or changed:
        workspace.save_dashboard(project.id, dashboard)
    return project


def dashboard_panels(prediction_columns: Sequence[str]) -> list[DashboardPanelPlot]:
    """Panels of the headline numbers: drift share and count, prediction drift, rows, quality.

    Series are picked by Evidently metric type and labels and by the snapshot tags
    (`drift`/`performance` for the champion, `challenger-drift` and so on for the others:
    models.report.snapshot_tags). The UI matches each point of a panel to the panel's first
    series with that metric and labels, and drops it if that series' tags then differ: so
    series differing by tag only cannot share a panel. The two row counts sit in separate
    panels, and each variant has its own panel of each headline number, the champion's
    first and titled as before, the challenger's beside it, then the shadow's. The
    champion's panels filter by tag only, so windows kept before variants existed stay in
    its charts.
    """
    panels = _variant_panels(DEFAULT_VARIANT, prediction_columns)
    challenger, shadow = (_variant_panels(v, prediction_columns) for v in OTHER_VARIANTS)
    side_by_side = [p for pair in zip(panels, challenger, strict=True) for p in pair]
    return [*side_by_side, *shadow, *_champion_only_panels()]


def _variant_panels(variant: str, prediction_columns: Sequence[str]) -> list[DashboardPanelPlot]:
    """The headline numbers of one variant's snapshots, half a row each."""
    drift: dict[str, Any] = {"tags": snapshot_tags(DRIFT_TAG, variant)}
    perf: dict[str, Any] = {"tags": snapshot_tags(PERFORMANCE_TAG, variant)}
    suffix = "" if variant == DEFAULT_VARIANT else f" ({variant})"
    return [
        line_plot_panel(
            f"Share of drifted features{suffix}",
            [
                PanelMetric(
                    legend=f"share ({variant})",
                    metric="DriftedColumnsCount",
                    metric_labels={"value_type": "share"},
                    **drift,
                )
            ],
            description=f"DataDriftPreset over the model's features, {variant} traffic",
            size="half",
        ),
        line_plot_panel(
            f"Prediction drift score{suffix}",
            [
                PanelMetric(
                    legend=f"{column} ({{{{method}}}})",
                    metric="ValueDrift",
                    metric_labels={"column": column},
                    **drift,
                )
                for column in prediction_columns
            ],
            description=f"ValueDrift of the {variant}'s predictions against its reference's",
            size="half",
        ),
        line_plot_panel(
            f"Model quality on labelled rows{suffix}",
            [
                PanelMetric(legend="accuracy", metric="Accuracy", **perf),
                PanelMetric(legend="F1 (positive class)", metric="F1Score", **perf),
                PanelMetric(legend="ROC AUC", metric="RocAuc", **perf),
            ],
            description=f"ClassificationPreset on the {variant}'s rows whose label has arrived",
            size="half",
        ),
        bar_plot_panel(
            f"Rows in window{suffix}",
            [PanelMetric(legend=f"rows ({variant})", metric="RowCount", **drift)],
            size="half",
        ),
    ]


def _champion_only_panels() -> list[DashboardPanelPlot]:
    """The champion's details: drifted feature count, F1 by class, labelled rows."""
    return [
        bar_plot_panel(
            "Drifted features",
            [
                PanelMetric(
                    legend="features",
                    metric="DriftedColumnsCount",
                    metric_labels={"value_type": "count"},
                    tags=[DRIFT_TAG],
                )
            ],
            size="half",
        ),
        line_plot_panel(
            "F1 by class",
            [
                PanelMetric(
                    legend="F1 of {{label}}",
                    metric="F1ByLabel",
                    tags=[PERFORMANCE_TAG],
                )
            ],
            description="their mean is the macro F1",
            size="half",
        ),
        bar_plot_panel(
            "Labelled rows",
            [
                PanelMetric(
                    legend="labelled rows",
                    metric="RowCount",
                    tags=[PERFORMANCE_TAG],
                )
            ],
            size="half",
        ),
    ]


def _flatten(items: Iterable[Any]) -> Iterator[Any]:
    for item in items:
        inner = getattr(item, "snapshots", None)
        if inner is not None:
            yield from inner
        else:
            yield item


def _run_name(snapshot: Any, description: str | None) -> str | None:
    """`description (drift)` / `description (performance)`; None keeps the snapshot's name."""
    if description is None:
        return None
    model = snapshot.to_snapshot_model()
    part = model.metadata.get(PART_KEY) or next(
        (t for t in (DRIFT_TAG, PERFORMANCE_TAG) if t in model.tags), None
    )
    return f"{description} ({part})" if part else description
