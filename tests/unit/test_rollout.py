"""A rollout step's verdict from live numbers (models/rollout.py), with known numbers.

The tests are checked against independent oracles where one exists: statsmodels' two-
proportion z-test, scikit-learn's ROC AUC, and Hanley & McNeil's own worked example.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import roc_auc_score
from statsmodels.stats.proportion import proportions_ztest  # type: ignore[import-untyped]

from common.errors import UserError
from common.params import RolloutParams, load_params
from common.store.variants import VariantNumbers
from models import rollout
from tests.workspace import ROOT

POLICY = RolloutParams(
    steps=[10, 50, 100],
    min_samples=500,
    min_labels=200,
    alpha=0.05,
    error_rate_margin=0.01,
    latency_p95_margin_ms=20,
    latency_p95_margin_share=0.2,
    accuracy_margin=0.02,
    roc_auc_margin=0.02,
)


def labelled(n: int, auc_signal: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) of n labelled requests; `auc_signal` separates the classes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n).astype(np.int8)
    scores = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + auc_signal * (2 * labels - 1))))
    return labels, scores


def arm(
    variant: str,
    *,
    requests: int = 2000,
    step: int | None = None,
    errors: int = 0,
    p95: float = 50.0,
    n_labels: int = 1000,
    accuracy: float = 0.85,
    signal: float = 1.5,
    seed: int = 0,
) -> VariantNumbers:
    labels, scores = labelled(n_labels, signal, seed)
    return VariantNumbers(
        variant=variant,
        version="1" if variant == "champion" else "2",
        requests=requests,
        step_requests=requests if step is None else step,
        errors=errors,
        latency_p50_ms=p95 / 2,
        latency_p95_ms=p95,
        labelled=n_labels,
        correct=round(accuracy * n_labels),
        labels=labels,
        scores=scores,
    )


def judge(
    champion: VariantNumbers, challenger: VariantNumbers, last: bool = False
) -> rollout.Verdict:
    return rollout.judge(POLICY, champion, challenger, weight=10, last=last)


def test_the_proportion_test_agrees_with_statsmodels() -> None:
    worse_by, p = rollout.proportion_p(150, 1000, 200, 1000)
    z, expected = proportions_ztest([200, 150], [1000, 1000], alternative="larger")
    assert worse_by == pytest.approx(0.05)
    assert p == pytest.approx(expected, rel=1e-9)
    assert z == pytest.approx(2.9424, abs=1e-4)


def test_roc_auc_agrees_with_scikit_learn_ties_included() -> None:
    labels, scores = labelled(500, 1.0, seed=3)
    assert rollout.roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    tied = np.round(scores, 1)
    assert rollout.roc_auc(labels, tied) == pytest.approx(roc_auc_score(labels, tied))
    assert rollout.roc_auc(np.ones(5, dtype=np.int8), scores[:5]) is None


def test_hanley_mcneil_standard_error_matches_the_papers_example() -> None:
    # Hanley & McNeil (1982), Radiology 143:29-36: 58 normal, 51 abnormal, AUC 0.893, SE 0.032
    assert rollout.hanley_mcneil_se(0.893, 51, 58) == pytest.approx(0.032, abs=0.001)


def test_holds_until_the_challenger_has_enough_requests_in_the_step() -> None:
    verdict = judge(arm("champion"), arm("challenger", step=120))
    assert verdict.action == rollout.HOLD
    assert "challenger 120/500 requests at 10%" in verdict.reason


def test_at_full_weight_the_champions_earlier_requests_count() -> None:
    champion = arm("champion", requests=900, step=0)  # none since the 100% step began
    verdict = rollout.judge(POLICY, champion, arm("challenger"), weight=100, last=True)
    assert verdict.action == rollout.PROMOTE


def test_a_no_worse_challenger_advances_then_is_promoted_after_the_last_step() -> None:
    champion, challenger = arm("champion"), arm("challenger", seed=1)
    assert judge(champion, challenger).action == rollout.ADVANCE
    promoted = judge(champion, challenger, last=True)
    assert promoted.action == rollout.PROMOTE
    assert "error_rate, latency_p95_ms, accuracy, roc_auc" in promoted.reason


def test_rolls_back_on_lower_accuracy_naming_the_metric_and_the_amount() -> None:
    verdict = judge(arm("champion", accuracy=0.85), arm("challenger", accuracy=0.75, seed=1))
    assert verdict.action == rollout.ROLL_BACK
    failed = verdict.failed
    assert failed is not None
    assert failed.metric == rollout.ACCURACY
    assert failed.worse_by == pytest.approx(0.10)
    assert failed.p_value is not None
    assert failed.p_value < 1e-6
    assert "accuracy: champion 0.85, challenger 0.75, worse by 0.1 (margin 0.02" in verdict.reason


def test_rolls_back_on_a_lower_roc_auc() -> None:
    verdict = judge(arm("champion", signal=1.5), arm("challenger", signal=0.2, seed=1))
    assert verdict.action == rollout.ROLL_BACK
    assert verdict.failed is not None
    assert verdict.failed.metric == rollout.ROC_AUC
    assert verdict.failed.worse_by is not None
    assert verdict.failed.worse_by > 0.2


def test_a_worse_accuracy_that_is_not_significant_does_not_roll_back() -> None:
    # 0.85 vs 0.79 on 200 labels each: 6 points worse, but p ~ 0.06 > 0.05
    champion = arm("champion", n_labels=200, accuracy=0.85)
    challenger = arm("challenger", n_labels=200, accuracy=0.79, seed=1)
    comparison = rollout.compare_accuracy(POLICY, champion, challenger)
    assert comparison.worse_by == pytest.approx(0.06)
    assert comparison.p_value is not None
    assert comparison.p_value > POLICY.alpha
    assert not comparison.worse


def test_a_significant_difference_within_the_margin_does_not_roll_back() -> None:
    big = 200_000  # 0.850 vs 0.845 on 200,000 labels each: certain, but under 0.02
    comparison = rollout.compare_accuracy(
        POLICY,
        replace(arm("champion"), labelled=big, correct=int(0.85 * big)),
        replace(arm("challenger"), labelled=big, correct=int(0.845 * big)),
    )
    assert comparison.p_value is not None
    assert comparison.p_value < 0.001
    assert not comparison.worse


def test_accuracy_waits_for_min_labels_and_the_verdict_says_so() -> None:
    verdict = judge(arm("champion", n_labels=50), arm("challenger", n_labels=50, accuracy=0.5))
    assert verdict.action == rollout.ADVANCE
    assert "accuracy: not judged (50 labels, 200 needed)" in verdict.reason


def test_a_failing_challenger_is_rolled_back_before_min_samples() -> None:
    verdict = judge(arm("champion", requests=300), arm("challenger", requests=20, errors=20))
    assert verdict.action == rollout.ROLL_BACK
    assert verdict.failed is not None
    assert verdict.failed.metric == rollout.ERROR_RATE
    assert verdict.failed.challenger == pytest.approx(0.5)


def test_latency_margin_is_the_larger_of_milliseconds_and_share() -> None:
    # champion p95 50 ms: margin max(20 ms, 0.2 * 50 = 10 ms) = 20 ms
    assert judge(arm("champion"), arm("challenger", p95=69)).action == rollout.ADVANCE
    slow = judge(arm("champion"), arm("challenger", p95=75))
    assert slow.action == rollout.ROLL_BACK
    assert slow.failed is not None
    assert slow.failed.metric == rollout.LATENCY_P95
    # champion p95 500 ms: margin 100 ms
    assert judge(arm("champion", p95=500), arm("challenger", p95=590)).action == rollout.ADVANCE


def test_rollout_params_refuse_steps_that_do_not_ramp_up() -> None:
    with pytest.raises(ValueError, match="steps must increase"):
        RolloutParams(steps=[50, 10, 100])
    with pytest.raises(ValueError, match=r"percentages in \(0, 100\]"):
        RolloutParams(steps=[10, 150])


def test_a_tenant_overrides_rollout_keys_and_keeps_the_rest(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tenants"]["acme"]["rollout"] = {"min_samples": 50, "canary": True}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    params = load_params(path)
    acme = params.for_tenant("acme").rollout
    assert (acme.min_samples, acme.canary) == (50, True)
    assert acme.steps == params.rollout.steps
    assert params.rollout.canary is False


def test_a_bad_rollout_key_in_params_yaml_is_a_user_error_naming_it(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["rollout"]["alpha"] = 2
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match=r"rollout\.alpha"):
        load_params(path)
