"""A monitor run's current data: the window's logged rows, shaped like the reference.

The store reads the rows (it may not import models/); the reference decides the positive
class, the per-class probability columns of a multiclass model, and the dtype the logged
labels and predictions take, so the drift checks compare like with like.

A run is the shared model's (tenant None: the traffic it served, every tenant's) or one
tenant's (only that tenant's rows, against the model that serves it: its own champion
`<MODEL_NAME>.<tenant>@champion` if it has one, else the shared champion).

Within a window each variant (champion, challenger, shadow: predictions.variant) is its
own current data, against its own version's reference: `live_variants` says which
(variant, version) pairs answered, `version_of` fetches a pair's version.
"""

from __future__ import annotations

import pandas as pd

from common import registry
from common.params import Params
from common.registry import served as served_model
from common.registry.served import ServedModel
from common.settings import Settings
from common.store import monitoring
from models import drift


def serving_model(settings: Settings, tenant: str | None) -> str:
    """The registered model whose alias serves `tenant`: its own if it has a version under
    the alias, else the shared one."""
    if tenant is not None:
        own = registry.model_name(settings, tenant)
        if registry.version_by_alias(registry.connect(settings), own, settings.model_alias):
            return own
    return registry.model_name(settings)


def served(settings: Settings, tenant: str | None, version: str | None) -> ServedModel:
    """The version to monitor for `tenant`, downloaded: the one the predictor serves it
    (`served.for_tenant`), or `version` of the model that serves it."""
    cache = served_model.cache_dir(settings)
    if version is None:
        return served_model.for_tenant(settings, tenant, cache)
    return served_model.by_version(settings, serving_model(settings, tenant), version, cache)


def version_of(settings: Settings, model_name: str, version: str) -> ServedModel:
    """`version` of `model_name` (a challenger's or shadow's), downloaded with its reference."""
    return served_model.by_version(settings, model_name, version, served_model.cache_dir(settings))


def live_variants(
    database_url: str, window: monitoring.Window, tenant: str | None = None
) -> list[monitoring.LiveVariant]:
    """The challengers and shadows with rows in the window of its model (`tenant`'s rows only,
    if set): every (variant, version) but the champion's, which the run judges anyway."""
    live = monitoring.live_variants(database_url, window, None if tenant is None else [tenant])
    return [v for v in live if v.variant != monitoring.CHAMPION]


def read_current(
    database_url: str,
    window: monitoring.Window,
    params: Params,
    reference: pd.DataFrame,
    tenant: str | None = None,
) -> pd.DataFrame:
    """The window's logged predictions and labels, in the reference's dtype.

    `tenant` None reads every tenant's traffic of the window's model; a tenant id, its own.
    At most params.yaml `monitor.max_rows` rows: a larger window is read as a sample.
    """
    target = params.data.target
    positive = str(sorted(reference[target].dropna().unique().tolist())[-1])
    current = monitoring.read_window(
        database_url,
        window,
        params.data,
        positive_class=positive,
        prediction_column=params.monitor.prediction_column,
        probability_column=params.monitor.probability_column,
        class_columns=drift.class_columns(reference, params.data),
        tenants=None if tenant is None else [tenant],
        max_rows=params.monitor.max_rows,
        seed=params.monitor.seed,
    )
    for col in (target, params.monitor.prediction_column):
        current[col] = monitoring.target_like(current[col], reference[target])
    return current
