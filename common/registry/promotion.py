"""The one promotion path: every move of `champion` goes through `move_champion`.

The register stage's gate, the promote flow, a rollback (and a rollout's completion) all
call it, so every champion carries the same record, on the version itself: the champion it
replaced (`alias.champion.previous`, where a rollback returns), who or what decided, why,
the evidence, and when (common/registry/tags.py, "one promotion record"). A registered
model's name is the argument, so a tenant's own model (`<MODEL_NAME>.<tenant>`) moves the
same way as the shared one.

Rollback walks the chain back: it points `champion` at the current champion's `previous`
and leaves that version's own `previous` as it was, so a second rollback returns to the
champion before that one, until a version that replaced none (then: a UserError).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from common.errors import UserError
from common.registry import (
    CHALLENGER,
    CHAMPION,
    aliased_versions,
    move_alias,
    set_tags,
    version_by_alias,
)
from common.registry import tags as tag

PREVIOUS = tag.alias_tag(CHAMPION, tag.ALIAS_PREVIOUS)
EVIDENCE = tag.alias_tag(CHAMPION, tag.ALIAS_EVIDENCE)
TAG_LIMIT = 5000
"""The longest model-version tag value MLflow stores."""

PROMOTED = "promoted"
RESTORED = "restored"
ROLLED_BACK = "rolled back"
REJECTED = "rejected"
HELD = "held"


@dataclass(frozen=True)
class Move:
    """One move of `champion` on registered model `name`."""

    name: str
    version: str
    """The champion now."""
    replaced: str | None
    """The champion before the move (None: there was none)."""
    by: str
    reason: str
    at: str
    rollback: bool = False

    def describe(self) -> str:
        """One line for people: `churn-classifier: champion v2 -> v1 (rollback by ...): why`."""
        before = f"v{self.replaced}" if self.replaced else "(none)"
        what = "rollback" if self.rollback else "promotion"
        return (
            f"{self.name}: champion {before} -> v{self.version} ({what} by {self.by}, "
            f"{self.at}): {self.reason}"
        )


def now() -> str:
    """UTC, to the second: the `set_at` / `decided_at` format."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def shorten(text: str, limit: int = TAG_LIMIT) -> str:
    """A tag value MLflow accepts (at most 5,000 characters)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def record_decision(
    client: MlflowClient,
    name: str,
    version: str,
    *,
    decision: str,
    by: str,
    reason: str,
    at: str | None = None,
) -> None:
    """Tag a decision about `version` (promoted, restored, rolled back, rejected, held)."""
    set_tags(
        client,
        name,
        version,
        {
            tag.PROMOTE_DECISION: decision,
            tag.PROMOTE_DECIDED_BY: by,
            tag.PROMOTE_DECIDED_AT: at or now(),
            tag.PROMOTE_REASON: shorten(reason),
        },
    )


def move_champion(
    client: MlflowClient,
    name: str,
    version: str,
    *,
    by: str,
    reason: str,
    evidence: Mapping[str, Any] | None = None,
    rollback: bool = False,
) -> Move:
    """Point `champion` of `name` at `version`, recording the move on that version.

    `by`: who or what decided; `reason`: why; `evidence`: what the decision rested on (the
    gate's metrics and comparison, a reviewer, live numbers), stored as JSON. A promotion
    records the champion it replaces as `alias.champion.previous`; a rollback (`rollback`,
    called by `rollback()`) keeps the version's own `previous`, so the chain walks back.
    A version that was `challenger` stops being it.
    """
    version = str(version)
    current = version_by_alias(client, name, CHAMPION)
    replaced = str(current.version) if current is not None else None
    at = now()
    move_alias(client, name, CHAMPION, version, by=by, reason=shorten(reason), at=at)
    record: dict[str, Any] = {
        EVIDENCE: shorten(json.dumps(dict(evidence or {}), sort_keys=True, default=str))
    }
    if not rollback and replaced != version:
        if replaced is None:
            _delete_tag(client, name, version, PREVIOUS)  # a stale one would mislead rollback
        else:
            record[PREVIOUS] = replaced
    set_tags(client, name, version, record)
    record_decision(
        client,
        name,
        version,
        decision=RESTORED if rollback else PROMOTED,
        by=by,
        reason=reason,
        at=at,
    )
    challenger = version_by_alias(client, name, CHALLENGER)
    if challenger is not None and str(challenger.version) == version:
        client.delete_registered_model_alias(name, CHALLENGER)
    return Move(name, version, replaced, by, reason, at, rollback)


def rollback_target(client: MlflowClient, name: str) -> tuple[str, str]:
    """(current champion, the version a rollback returns to); a UserError when there is none."""
    current = version_by_alias(client, name, CHAMPION)
    if current is None:
        raise UserError(f"{name} has no '{CHAMPION}': nothing to roll back.")
    previous = current.tags.get(PREVIOUS)
    if not previous:
        raise UserError(
            f"{name} v{current.version} has no {PREVIOUS} tag: no earlier champion to "
            f"return to (v{current.version} replaced none: the first champion the registry "
            "records)."
        )
    if previous == str(current.version):
        raise UserError(f"{name} v{previous} names itself as {PREVIOUS}: nothing to return to.")
    try:
        client.get_model_version(name, previous)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise UserError(
            f"{name} v{current.version}'s previous champion v{previous} no longer exists "
            "in the registry: nothing to return to; promote a version instead."
        ) from exc
    return str(current.version), previous


def rollback_candidates(client: MlflowClient, name: str) -> dict[str, tuple[str, str]]:
    """Tenants' own models of `name` (`<name>.<tenant>`) a rollback could move now:
    registered name -> (champion, the version it would return to)."""
    found: dict[str, tuple[str, str]] = {}
    for model in sorted(aliased_versions(client, name, CHAMPION)):
        if model == name:
            continue
        try:
            found[model] = rollback_target(client, model)
        except UserError:
            continue
    return found


def rollback(client: MlflowClient, name: str, *, by: str, reason: str) -> Move:
    """Point `champion` back at the version the current champion replaced.

    The version left is tagged `promote.decision: rolled back`; the one returned to is
    recorded as every champion is (`restored`, with `rolled_back_from` in its evidence) and
    keeps its own `previous`, so the next rollback goes one further back.
    """
    current, previous = rollback_target(client, name)
    move = move_champion(
        client,
        name,
        previous,
        by=by,
        reason=reason,
        evidence={"rolled_back_from": current},
        rollback=True,
    )
    record_decision(client, name, current, decision=ROLLED_BACK, by=by, reason=reason, at=move.at)
    return move


def _delete_tag(client: MlflowClient, name: str, version: str, key: str) -> None:
    try:
        client.delete_model_version_tag(name, version, key)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
