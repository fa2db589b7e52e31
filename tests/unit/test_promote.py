"""The promotion policy: what must improve, what may not get worse, in either direction."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from common.params import PromoteParams
from models.promote import judge

POLICY = PromoteParams(improve={"roc_auc": 0.01}, no_worse={"log_loss": 0.02})
CHAMPION = {"roc_auc": 0.80, "log_loss": 0.40, "f1_macro": 0.7, "accuracy": 0.8}


def _challenger(**changes: float) -> dict[str, float]:
    return CHAMPION | changes


def test_passes_without_a_champion() -> None:
    verdict = judge(POLICY, _challenger(), None)
    assert verdict.passed
    assert verdict.summary == "no champion yet"


def test_passes_when_the_metric_improves_enough_and_nothing_gets_worse() -> None:
    verdict = judge(POLICY, _challenger(roc_auc=0.82, log_loss=0.41), CHAMPION)
    assert verdict.passed
    assert "roc_auc 0.8200 vs 0.8000: gain +0.0200 >= required 0.01" in verdict.summary
    assert "within tolerance 0.02" in verdict.summary


def test_rejects_an_improvement_below_the_required_gain() -> None:
    verdict = judge(POLICY, _challenger(roc_auc=0.805), CHAMPION)
    assert not verdict.passed
    assert "< required 0.01" in verdict.summary


def test_rejects_a_guarded_metric_that_gets_worse_beyond_its_tolerance() -> None:
    verdict = judge(POLICY, _challenger(roc_auc=0.85, log_loss=0.45), CHAMPION)
    assert not verdict.passed
    assert "log_loss 0.4500 vs 0.4000: change -0.0500 beyond tolerance 0.02" in verdict.summary


def test_lower_log_loss_counts_as_an_improvement() -> None:
    policy = PromoteParams(improve={"log_loss": 0.05})
    assert judge(policy, _challenger(log_loss=0.30), CHAMPION).passed
    assert not judge(policy, _challenger(log_loss=0.38), CHAMPION).passed


def test_policy_needs_at_least_one_metric_to_improve() -> None:
    with pytest.raises(ValidationError):
        PromoteParams(improve={})


def test_policy_rejects_negative_amounts() -> None:
    with pytest.raises(ValidationError, match=r"no_worse\.f1_macro"):
        PromoteParams(improve={"roc_auc": 0.0}, no_worse={"f1_macro": -0.1})


def test_policy_rejects_unknown_metrics() -> None:
    with pytest.raises(ValidationError):
        PromoteParams.model_validate({"improve": {"precision": 0.1}})
