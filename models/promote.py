"""promote and rollback: move `champion` under the policy in params.yaml, recorded in tags.

`challenger` and `champion` are scored on the same holdout; the challenger is promoted
only when every `improve` metric gains at least its amount and no `no_worse` metric
loses more than its tolerance. Every decision is tagged on the version it concerns:
`promote.decision`, `promote.decided_by`, `promote.decided_at`, `promote.reason`. A
promotion and a rollback move `champion` through `common.registry.promotion`, the one path
the register stage's gate takes too: the version records the champion it replaced
(`alias.champion.previous`, where rollback returns) and the evidence (both scores).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from common import paths, registry
from common.errors import UserError
from common.params import DataParams, PromoteParams
from common.registry import promotion, served
from models.evaluate import LOWER_IS_BETTER, score

PREVIOUS = promotion.PREVIOUS


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: list[str]

    @property
    def summary(self) -> str:
        return "; ".join(self.reasons)


@dataclass(frozen=True)
class Candidates:
    """The challenger and champion versions and their metrics on the same holdout."""

    challenger: str
    champion: str | None
    challenger_metrics: dict[str, float]
    champion_metrics: dict[str, float] | None


def gain(metric: str, new: float, old: float) -> float:
    """How much better `new` is than `old` (positive is better, whatever the direction)."""
    return old - new if metric in LOWER_IS_BETTER else new - old


def judge(
    policy: PromoteParams, challenger: dict[str, float], champion: dict[str, float] | None
) -> Verdict:
    """Apply the policy; with no champion the challenger passes."""
    if champion is None:
        return Verdict(True, ["no champion yet"])
    passed, reasons = True, []
    for metric, needed in policy.improve.items():
        g = gain(metric, challenger[metric], champion[metric])
        ok = g >= needed
        passed &= ok
        reasons.append(
            f"{metric} {challenger[metric]:.4f} vs {champion[metric]:.4f}: gain {g:+.4f} "
            f"{'>=' if ok else '<'} required {needed}"
        )
    for metric, tolerance in policy.no_worse.items():
        g = gain(metric, challenger[metric], champion[metric])
        ok = g >= -tolerance
        passed &= ok
        reasons.append(
            f"{metric} {challenger[metric]:.4f} vs {champion[metric]:.4f}: change {g:+.4f} "
            f"{'within' if ok else 'beyond'} tolerance {tolerance}"
        )
    return Verdict(passed, reasons)


def _score_version(
    mv: ModelVersion, cache: Path, holdout: pd.DataFrame, data: DataParams
) -> dict[str, float]:
    """One version's metrics on the holdout: its sklearn pipeline, through the served-model
    handle (downloaded once into `cache`), as `evaluate` scored it."""
    return score(served.fetch(mv, cache).pipeline, holdout, data)


def candidates(
    client: MlflowClient,
    name: str,
    data: DataParams,
    cache: Path,
    holdout_path: Path = paths.HOLDOUT,
) -> Candidates:
    """Score challenger and champion on the holdout; a missing challenger is a UserError."""
    challenger = registry.version_by_alias(client, name, registry.CHALLENGER)
    if challenger is None:
        raise UserError(f"{name} has no '{registry.CHALLENGER}' version: nothing to promote.")
    champion = registry.version_by_alias(client, name, registry.CHAMPION)
    holdout = pd.read_parquet(holdout_path)
    new = _score_version(challenger, cache, holdout, data)
    if champion is None:
        return Candidates(str(challenger.version), None, new, None)
    old = _score_version(champion, cache, holdout, data)
    return Candidates(str(challenger.version), str(champion.version), new, old)


def compare(
    client: MlflowClient,
    name: str,
    data: DataParams,
    policy: PromoteParams,
    *,
    cache: Path,
    holdout_path: Path = paths.HOLDOUT,
) -> tuple[Candidates, Verdict]:
    """Score challenger and champion on the same holdout and apply the policy to them."""
    c = candidates(client, name, data, cache, holdout_path)
    return c, judge(policy, c.challenger_metrics, c.champion_metrics)


def evidence(c: Candidates, **extra: object) -> dict[str, object]:
    """What a promotion rested on: both versions' metrics on the same holdout, and `extra`."""
    return {
        "challenger": {"version": c.challenger, "metrics": c.challenger_metrics},
        "champion": (
            {"version": c.champion, "metrics": c.champion_metrics} if c.champion else None
        ),
        **extra,
    }


def promote(
    client: MlflowClient,
    name: str,
    c: Candidates,
    *,
    by: str,
    reason: str,
    extra: Mapping[str, object] | None = None,
) -> promotion.Move:
    """Move `champion` to the challenger through the one promotion path (which remembers
    the champion it replaced); `extra` joins the scores in the recorded evidence."""
    return promotion.move_champion(
        client, name, c.challenger, by=by, reason=reason, evidence=evidence(c, **(extra or {}))
    )


def reject(client: MlflowClient, name: str, c: Candidates, *, by: str, reason: str) -> None:
    """Keep the champion; the challenger keeps its alias and the reason in its tags."""
    promotion.record_decision(
        client, name, c.challenger, decision=promotion.REJECTED, by=by, reason=reason
    )


def rollback(client: MlflowClient, name: str, *, by: str, reason: str) -> tuple[str, str]:
    """Point `champion` back at the version it replaced; return (from, to).

    A second rollback walks one further back (common.registry.promotion.rollback).
    """
    move = promotion.rollback(client, name, by=by, reason=reason)
    return str(move.replaced), move.version
