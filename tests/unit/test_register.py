"""The promotion gate: a challenger replaces the champion only when it wins by the margin."""

from __future__ import annotations

import pytest

from models.register import gate


def test_promotes_when_there_is_no_champion() -> None:
    promoted, reason = gate("roc_auc", 0.002, 0.6, None, None)
    assert promoted
    assert reason == "no champion yet"


def test_promotes_a_challenger_that_wins_by_more_than_the_margin() -> None:
    promoted, reason = gate("roc_auc", 0.002, 0.805, 0.800, "3")
    assert promoted
    assert "beats" in reason
    assert "champion v3" in reason
    assert "0.8050" in reason
    assert "0.8000" in reason


def test_promotes_a_challenger_that_wins_by_exactly_the_margin() -> None:
    promoted, _ = gate("roc_auc", 0.25, 0.75, 0.5, "1")
    assert promoted


def test_rejects_a_challenger_that_wins_by_less_than_the_margin() -> None:
    promoted, reason = gate("roc_auc", 0.002, 0.801, 0.800, "3")
    assert not promoted
    assert "does not beat" in reason
    assert "+0.0010" in reason


def test_rejects_a_worse_challenger() -> None:
    promoted, reason = gate("accuracy", 0.0, 0.79, 0.80, "2")
    assert not promoted
    assert "-0.0100" in reason


@pytest.mark.parametrize(
    ("challenger", "champion", "promoted"),
    [(0.30, 0.40, True), (0.40, 0.30, False), (0.399, 0.40, False)],
    ids=["lower-wins", "higher-loses", "lower-within-margin"],
)
def test_log_loss_is_lower_is_better(challenger: float, champion: float, promoted: bool) -> None:
    decision, reason = gate("log_loss", 0.002, challenger, champion, "1")
    assert decision is promoted
    assert reason.startswith("log_loss")
