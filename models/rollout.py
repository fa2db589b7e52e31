"""rollout: judge one step of a canary from the two variants' live numbers.

Pure: the rollout flow reads the numbers (common.store.variants) and moves the aliases; this
module only compares and decides. A step's verdict is one of:

- `hold`: not enough traffic yet (the challenger's requests in this step, or the champion's
  since the rollout began, below `min_samples`); poll again;
- `advance` to the next step, or `promote` after the last one: nothing is worse by more
  than its margin;
- `roll back`: one metric is worse by more than its margin (the reason names it and by how
  much). A significantly higher error rate rolls back even before `min_samples`: a
  challenger failing its requests is not kept on traffic to collect more failures.

What counts as worse (params.yaml `rollout:`):
- error rate (errors / attempts): higher by more than `error_rate_margin`, and significant
  (one-sided two-proportion z-test at `alpha`);
- latency p95: higher by more than the larger of `latency_p95_margin_ms` and
  `latency_p95_margin_share` of the champion's p95 (no test: a p95 is already a tail);
- accuracy: lower by more than `accuracy_margin`, and significant (two-proportion z-test);
- ROC AUC: lower by more than `roc_auc_margin`, and significant (z-test on the difference of
  two independent AUCs, each with its Hanley-McNeil standard error).
Accuracy and ROC AUC are judged only once each variant has `min_labels` labelled requests;
before that the verdict rests on error rate and latency and says so. "Significant" tests
"the challenger is worse at all" (H0: no difference); the margin says by how much worse
matters, so a tiny but certain difference never rolls back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
from scipy import stats

from common.params import RolloutParams

Action = Literal["hold", "advance", "promote", "roll back"]
HOLD: Action = "hold"
ADVANCE: Action = "advance"
PROMOTE: Action = "promote"
ROLL_BACK: Action = "roll back"

ERROR_RATE = "error_rate"
LATENCY_P95 = "latency_p95_ms"
ACCURACY = "accuracy"
ROC_AUC = "roc_auc"


class LiveNumbers(Protocol):
    """One variant's live numbers over the rollout's window (common.store.variants reads
    them; any object with these attributes will do)."""

    @property
    def variant(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def requests(self) -> int:
        """Predictions logged in the window."""

    @property
    def step_requests(self) -> int:
        """Of those, logged since the current step began."""

    @property
    def errors(self) -> int:
        """Requests it failed to score (serving_errors)."""

    @property
    def latency_p50_ms(self) -> float | None: ...
    @property
    def latency_p95_ms(self) -> float | None: ...
    @property
    def labelled(self) -> int: ...
    @property
    def correct(self) -> int: ...
    @property
    def labels(self) -> np.ndarray:
        """Per labelled request: 1 when the label is the positive class, else 0."""

    @property
    def scores(self) -> np.ndarray:
        """Per labelled request: the logged probability of the positive class."""


@dataclass(frozen=True)
class Comparison:
    """One metric, champion against challenger."""

    metric: str
    champion: float | None
    challenger: float | None
    worse_by: float | None
    """How much worse the challenger is (positive: worse; the metric's own direction)."""
    margin: float
    p_value: float | None = None
    judged: bool = True
    why_not: str = ""
    worse: bool = False
    """Worse by more than the margin (and significantly, where a test applies)."""

    def describe(self) -> str:
        """`accuracy: champion 0.850, challenger 0.700, worse by 0.150 (margin 0.02, p=0.001)`."""
        if not self.judged:
            return f"{self.metric}: not judged ({self.why_not})"
        p = f", p={self.p_value:.3g}" if self.p_value is not None else ""
        return (
            f"{self.metric}: champion {_fmt(self.champion)}, challenger {_fmt(self.challenger)}, "
            f"worse by {_fmt(self.worse_by)} (margin {self.margin:g}{p})"
        )


@dataclass(frozen=True)
class Verdict:
    """A step's decision, the comparisons it rests on, and why in one line."""

    action: Action
    reason: str
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def failed(self) -> Comparison | None:
        """The comparison that rolled the challenger back (None: nothing is worse)."""
        return worst(self.comparisons)


def worst(comparisons: Sequence[Comparison]) -> Comparison | None:
    """The metric worse by the most margins (the one a rollback names), or None."""
    worse = [c for c in comparisons if c.worse]
    return max(worse, key=lambda c: (c.worse_by or 0) / (c.margin or 1), default=None)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def one_sided_p(worse_by: float, se: float) -> float:
    """P(a difference at least this much worse | no difference), for a z statistic."""
    if se <= 0:
        return 0.0 if worse_by > 0 else 1.0
    return float(stats.norm.sf(worse_by / se))


def proportion_p(successes_a: int, n_a: int, successes_b: int, n_b: int) -> tuple[float, float]:
    """(p_b - p_a, one-sided p that b's rate is higher): the pooled two-proportion z-test."""
    rate_a, rate_b = successes_a / n_a, successes_b / n_b
    pooled = (successes_a + successes_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    return rate_b - rate_a, one_sided_p(rate_b - rate_a, se)


def roc_auc(
    labels: np.ndarray | Sequence[int], scores: np.ndarray | Sequence[float]
) -> float | None:
    """ROC AUC by the Mann-Whitney statistic (ties count half); None without both classes."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=float)
    positives, negatives = int(y.sum()), int((~y).sum())
    if positives == 0 or negatives == 0:
        return None
    ranks = stats.rankdata(s)
    u = ranks[y].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def hanley_mcneil_se(auc: float, positives: int, negatives: int) -> float:
    """Standard error of an AUC (Hanley & McNeil, 1982)."""
    q1 = auc / (2 - auc)
    q2 = 2 * auc * auc / (1 + auc)
    variance = (
        auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc)
    ) / (positives * negatives)
    return math.sqrt(max(variance, 0.0))


def compare_error_rate(
    policy: RolloutParams, champion: LiveNumbers, challenger: LiveNumbers
) -> Comparison:
    """Errors per attempt (a logged prediction or a serving error), higher is worse."""
    n_a, n_b = champion.requests + champion.errors, challenger.requests + challenger.errors
    margin = policy.error_rate_margin
    if n_a == 0 or n_b == 0:
        return Comparison(ERROR_RATE, None, None, None, margin, judged=False, why_not="no traffic")
    return _rates(
        ERROR_RATE,
        policy,
        margin,
        (champion.errors, n_a, champion.errors / n_a),
        (challenger.errors, n_b, challenger.errors / n_b),
    )


def _rates(
    metric: str,
    policy: RolloutParams,
    margin: float,
    champion: tuple[int, int, float],
    challenger: tuple[int, int, float],
) -> Comparison:
    """A share of bad outcomes compared one-sided: each side (bad, attempts, value shown);
    worse beyond `margin` and significant at `alpha`."""
    worse_by, p = proportion_p(champion[0], champion[1], challenger[0], challenger[1])
    return Comparison(
        metric,
        champion[2],
        challenger[2],
        worse_by,
        margin,
        p_value=p,
        worse=worse_by > margin and p < policy.alpha,
    )


def compare_latency(
    policy: RolloutParams, champion: LiveNumbers, challenger: LiveNumbers
) -> Comparison:
    """p95 latency, higher is worse by more than the larger of the two margins."""
    a, b = champion.latency_p95_ms, challenger.latency_p95_ms
    if a is None or b is None:
        return Comparison(LATENCY_P95, a, b, None, 0.0, judged=False, why_not="no traffic")
    margin = max(policy.latency_p95_margin_ms, policy.latency_p95_margin_share * a)
    return Comparison(LATENCY_P95, a, b, b - a, margin, worse=b - a > margin)


def _labels_short(policy: RolloutParams, champion: LiveNumbers, challenger: LiveNumbers) -> str:
    fewest = min(champion.labelled, challenger.labelled)
    if fewest >= policy.min_labels:
        return ""
    return f"{fewest} labels, {policy.min_labels} needed"


def compare_accuracy(
    policy: RolloutParams, champion: LiveNumbers, challenger: LiveNumbers
) -> Comparison:
    """Share of labelled requests predicted right, lower is worse (significantly)."""
    margin = policy.accuracy_margin
    if short := _labels_short(policy, champion, challenger):
        return Comparison(ACCURACY, None, None, None, margin, judged=False, why_not=short)
    # the share wrong: higher is worse, the same test as the error rate
    n_a, n_b = champion.labelled, challenger.labelled
    return _rates(
        ACCURACY,
        policy,
        margin,
        (n_a - champion.correct, n_a, champion.correct / n_a),
        (n_b - challenger.correct, n_b, challenger.correct / n_b),
    )


def compare_roc_auc(
    policy: RolloutParams, champion: LiveNumbers, challenger: LiveNumbers
) -> Comparison:
    """ROC AUC on the labelled requests, lower is worse (significantly: Hanley-McNeil)."""
    margin = policy.roc_auc_margin
    if short := _labels_short(policy, champion, challenger):
        return Comparison(ROC_AUC, None, None, None, margin, judged=False, why_not=short)
    a, b = roc_auc(champion.labels, champion.scores), roc_auc(challenger.labels, challenger.scores)
    if a is None or b is None:
        return Comparison(
            ROC_AUC, a, b, None, margin, judged=False, why_not="labels of one class only"
        )
    se = math.hypot(
        hanley_mcneil_se(a, *_class_counts(champion.labels)),
        hanley_mcneil_se(b, *_class_counts(challenger.labels)),
    )
    p = one_sided_p(a - b, se)
    return Comparison(
        ROC_AUC, a, b, a - b, margin, p_value=p, worse=a - b > margin and p < policy.alpha
    )


def _class_counts(labels: np.ndarray) -> tuple[int, int]:
    y = np.asarray(labels, dtype=bool)
    return int(y.sum()), int((~y).sum())


def compare(
    policy: RolloutParams, champion: LiveNumbers, challenger: LiveNumbers
) -> list[Comparison]:
    """Every metric, champion against challenger, in a fixed order."""
    return [
        compare_error_rate(policy, champion, challenger),
        compare_latency(policy, champion, challenger),
        compare_accuracy(policy, champion, challenger),
        compare_roc_auc(policy, champion, challenger),
    ]


def short_of_samples(
    policy: RolloutParams, champion: LiveNumbers, challenger: LiveNumbers, weight: float
) -> str:
    """Why the step cannot be judged yet ('' when it can).

    The challenger needs `min_samples` requests in this step; the champion `min_samples` in
    the whole rollout (at a weight of 100 it gets no new traffic: its earlier steps count).
    """
    needs = []
    if challenger.step_requests < policy.min_samples:
        needs.append(
            f"challenger {challenger.step_requests}/{policy.min_samples} requests at {weight:g}%"
        )
    if champion.requests < policy.min_samples:
        needs.append(f"champion {champion.requests}/{policy.min_samples} requests")
    return ", ".join(needs)


def judge(
    policy: RolloutParams,
    champion: LiveNumbers,
    challenger: LiveNumbers,
    *,
    weight: float,
    last: bool,
) -> Verdict:
    """The step's verdict at `weight` (percent); `last`: the final step (passing promotes)."""
    comparisons = compare(policy, champion, challenger)
    short = short_of_samples(policy, champion, challenger, weight)
    if short:
        errors = comparisons[0]
        if errors.worse:  # failing requests: no reason to wait for more of them
            return Verdict(ROLL_BACK, f"challenger worse: {errors.describe()}", comparisons)
        return Verdict(HOLD, f"waiting for traffic: {short}", comparisons)
    failed = worst(comparisons)
    if failed is not None:
        others = [c.metric for c in comparisons if c.worse and c is not failed]
        also = f" (also worse: {', '.join(others)})" if others else ""
        return Verdict(ROLL_BACK, f"challenger worse: {failed.describe()}{also}", comparisons)
    unjudged = [c.describe() for c in comparisons if not c.judged]
    note = f"; {'; '.join(unjudged)}" if unjudged else ""
    judged = ", ".join(c.metric for c in comparisons if c.judged) or "nothing"
    if last:
        return Verdict(
            PROMOTE, f"no worse than the champion at {weight:g}% ({judged}){note}", comparisons
        )
    return Verdict(
        ADVANCE, f"no worse than the champion at {weight:g}% ({judged}){note}", comparisons
    )
