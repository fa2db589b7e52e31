"""The register stage's gate: the promotion policy of params.yaml, against the champion."""

from __future__ import annotations

import pytest

from common.params import PromoteParams
from models.register import gate

POLICY = PromoteParams(improve={"roc_auc": 0.002}, no_worse={"log_loss": 0.01})
CHAMPION = {"roc_auc": 0.800, "log_loss": 0.40, "accuracy": 0.75}


def test_promotes_when_there_is_no_champion() -> None:
    promoted, reason = gate(POLICY, {"roc_auc": 0.6, "log_loss": 0.6}, None, None)
    assert promoted
    assert reason == "no champion yet"


def test_promotes_a_challenger_that_improves_by_the_amount_and_stays_within_tolerance() -> None:
    promoted, reason = gate(POLICY, {"roc_auc": 0.805, "log_loss": 0.405}, CHAMPION, "3")
    assert promoted
    assert "champion v3" in reason
    assert "passes" in reason
    assert "0.8050" in reason
    assert "0.8000" in reason


def test_rejects_a_challenger_that_improves_by_less_than_the_amount() -> None:
    promoted, reason = gate(POLICY, {"roc_auc": 0.801, "log_loss": 0.39}, CHAMPION, "3")
    assert not promoted
    assert "fails" in reason
    assert "+0.0010" in reason


def test_rejects_a_better_auc_bought_with_a_worse_log_loss() -> None:
    promoted, reason = gate(POLICY, {"roc_auc": 0.850, "log_loss": 0.45}, CHAMPION, "2")
    assert not promoted
    assert "beyond tolerance" in reason


@pytest.mark.parametrize(
    ("challenger", "promoted"),
    [(0.30, True), (0.50, False), (0.399, False)],
    ids=["lower-wins", "higher-loses", "lower-within-amount"],
)
def test_log_loss_is_lower_is_better(challenger: float, promoted: bool) -> None:
    policy = PromoteParams(improve={"log_loss": 0.002})
    decision, reason = gate(policy, {"log_loss": challenger}, {"log_loss": 0.40}, "1")
    assert decision is promoted
    assert "log_loss" in reason


def test_a_tenants_first_version_is_judged_against_the_shared_champion_by_name() -> None:
    promoted, reason = gate(
        POLICY,
        {"roc_auc": 0.801, "log_loss": 0.39},
        CHAMPION,
        "4",
        against="the shared champion churn-classifier",
    )
    assert not promoted
    assert reason.startswith(
        "vs the shared champion churn-classifier v4 on the same holdout, fails"
    )
