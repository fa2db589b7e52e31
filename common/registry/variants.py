"""Variants of a served model, by alias: who answers a request, and the traffic share.

A registered model (the shared one or a tenant's own) may carry, beside `champion`:
- `challenger`: answers a share of the traffic, the registered-model tag
  `rollout.challenger_weight` (percent, 0-100; no tag: 0). A canary ramps it 10 -> 50 ->
  100; an A/B test holds it; a rollback sets it to 0 and drops the alias.
- `shadow`: scored on a copy of the traffic after the answer, never returned; its rows are
  logged with variant `shadow`.

The share is a registered-model tag, not a version tag, so the predictor's one registry
search a poll (`search_registered_models`, aliases and tags together) sees every move.
Assignment is sticky: `assign` hashes the tenant and an entity key (the client's
`X-Entity-Key`, else the request's first request id), so one customer always sees one
variant at a given weight and A/B cohorts stay clean; raising the weight only moves keys
from champion to challenger, never back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Literal

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from common.registry import CHALLENGER, CHAMPION

SHADOW = "shadow"
Variant = Literal["champion", "challenger", "shadow"]
VARIANT_ALIASES: tuple[str, ...] = (CHAMPION, CHALLENGER, SHADOW)

WEIGHT_TAG = "rollout.challenger_weight"
"""Registered-model tag: the challenger's share of traffic, in percent (0-100)."""
WEIGHT_SET_BY_TAG = "rollout.set_by"
WEIGHT_SET_AT_TAG = "rollout.set_at"
WEIGHT_REASON_TAG = "rollout.reason"

ENTITY_HEADER = "X-Entity-Key"
"""The request header a client may send to keep one customer on one variant."""

BUCKETS = 10_000
"""Resolution of a weight: 0.01 percent."""


def bucket(tenant: str, key: str) -> int:
    """The entity's fixed place in [0, BUCKETS): blake2b of tenant and key, not `hash()`
    (the same in every worker and process, across restarts)."""
    digest = hashlib.blake2b(f"{tenant}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def assign(tenant: str, key: str, weight: float) -> Variant:
    """`challenger` for the entity's bucket below `weight` percent of BUCKETS, else `champion`."""
    if weight <= 0:
        return "champion"
    if weight >= 100:
        return "challenger"
    return "challenger" if bucket(tenant, key) < round(weight * BUCKETS / 100) else "champion"


def weight_of(tags: Mapping[str, str]) -> float:
    """The challenger's share a registered model's tags give (0 when unset or unreadable)."""
    try:
        value = float(tags.get(WEIGHT_TAG, "0"))
    except ValueError:
        return 0.0
    return min(max(value, 0.0), 100.0)


def set_weight(
    client: MlflowClient, name: str, weight: float, *, by: str, reason: str, at: str
) -> None:
    """Give the challenger of `name` `weight` percent of the traffic, recording who and why."""
    if not 0 <= weight <= 100:
        raise ValueError(f"a challenger weight is a percentage (0-100), got {weight}")
    for key, value in (
        (WEIGHT_TAG, f"{weight:g}"),
        (WEIGHT_SET_BY_TAG, by),
        (WEIGHT_SET_AT_TAG, at),
        (WEIGHT_REASON_TAG, reason[:5000]),
    ):
        client.set_registered_model_tag(name, key, value)


def current_weight(client: MlflowClient, name: str) -> float:
    """The challenger's share of `name` now (0 when the model does not exist)."""
    try:
        return weight_of(dict(client.get_registered_model(name).tags))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return 0.0
        raise
