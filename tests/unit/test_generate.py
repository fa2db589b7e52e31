"""The example data: realistic enough to train on, and each kind of drift really present."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from common.errors import UserError
from common.params import DataParams, MonitorParams, Params, TrainParams, ValidateParams
from models import drift as drift_core
from models.data import model_frame
from models.generate import (
    CATEGORICAL,
    EXAMPLE_TENANTS,
    NUMERIC,
    TARGET,
    Drift,
    example_tenant,
    generate,
)
from models.train import build
from models.validate import check

N = 20_000
SIGNIFICANT = 1e-6
"""p-value below which a shift counts as detected; real shifts land far below it."""
NOT_SIGNIFICANT = 0.01
"""p-value above which equal distributions must stay (Bonferroni-corrected when testing many)."""


def ks_pvalue(a: pd.Series, b: pd.Series) -> float:
    return float(stats.ks_2samp(a.dropna(), b.dropna()).pvalue)


def chi2_pvalue(a: pd.Series, b: pd.Series) -> float:
    """Chi-square test that two samples of a categorical column share one distribution."""
    values = pd.concat([a, b], ignore_index=True).fillna("<missing>")
    batch = np.r_[np.zeros(len(a)), np.ones(len(b))]
    return float(stats.chi2_contingency(pd.crosstab(values, batch)).pvalue)


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return generate(N, seed=101)


@pytest.fixture(scope="module")
def undrifted() -> pd.DataFrame:
    return generate(N, seed=202)


@pytest.fixture(scope="module")
def default_data(params: Params) -> pd.DataFrame:
    return generate(params.generate.rows, params.generate.seed)


def test_same_seed_gives_the_same_rows() -> None:
    pd.testing.assert_frame_equal(generate(2_000, seed=7), generate(2_000, seed=7))


def test_different_seeds_give_different_rows() -> None:
    a, b = generate(2_000, seed=7), generate(2_000, seed=8)
    assert not a[NUMERIC].equals(b[NUMERIC])


def test_default_params_give_at_least_fifty_thousand_rows(default_data: pd.DataFrame) -> None:
    assert len(default_data) >= 50_000
    assert default_data["customer_id"].is_unique


def test_has_numeric_and_categorical_features_as_params_declare(
    default_data: pd.DataFrame, data_params: DataParams
) -> None:
    assert set(data_params.numeric) == set(NUMERIC)
    assert set(data_params.categorical) == set(CATEGORICAL)
    for col in data_params.numeric:
        assert pd.api.types.is_float_dtype(default_data[col]), col
    for col in data_params.categorical:
        assert default_data[col].dtype == object, col
        assert default_data[col].nunique() >= 3, col


def test_has_missing_values_in_numeric_and_categorical_columns(
    default_data: pd.DataFrame,
) -> None:
    missing = default_data.isna().mean()
    assert (missing[NUMERIC] > 0.01).sum() >= 3
    assert (missing[CATEGORICAL] > 0.01).any()
    assert missing[TARGET] == 0


def test_classes_are_imbalanced(default_data: pd.DataFrame) -> None:
    assert set(default_data[TARGET].unique()) == {0, 1}
    assert 0.05 <= default_data[TARGET].mean() <= 0.35


def test_default_data_meets_the_data_contract(
    default_data: pd.DataFrame, data_params: DataParams, validate_params: ValidateParams
) -> None:
    report = check(default_data, data_params, validate_params)
    assert report.passed, report.message()


@pytest.mark.parametrize("feature", NUMERIC)
def test_covariate_shift_moves_a_numeric_feature(
    feature: str, reference: pd.DataFrame, undrifted: pd.DataFrame
) -> None:
    drifted = generate(N, seed=303, drift=Drift(covariate={feature: 0.5}))
    assert ks_pvalue(reference[feature], drifted[feature]) < SIGNIFICANT
    assert ks_pvalue(reference[feature], undrifted[feature]) > NOT_SIGNIFICANT


@pytest.mark.parametrize("feature", CATEGORICAL)
def test_covariate_shift_moves_a_categorical_feature(
    feature: str, reference: pd.DataFrame, undrifted: pd.DataFrame
) -> None:
    drifted = generate(N, seed=303, drift=Drift(covariate={feature: 0.2}))
    assert chi2_pvalue(reference[feature], drifted[feature]) < SIGNIFICANT
    assert chi2_pvalue(reference[feature], undrifted[feature]) > NOT_SIGNIFICANT


def test_categorical_shift_favours_the_first_category(reference: pd.DataFrame) -> None:
    drifted = generate(N, seed=303, drift=Drift(covariate={"contract_type": 0.3}))
    before = (reference["contract_type"] == "month_to_month").mean()
    after = (drifted["contract_type"] == "month_to_month").mean()
    assert after > before + 0.1


def test_covariate_shift_leaves_other_features_alone(reference: pd.DataFrame) -> None:
    drifted = generate(N, seed=303, drift=Drift(covariate={"avg_daily_usage_min": 1.0}))
    others = ["age", "num_products", "late_payments_12m", "support_tickets_90d"]
    for col in others:
        assert ks_pvalue(reference[col], drifted[col]) > NOT_SIGNIFICANT / len(others), col


def test_rejects_drift_on_an_unknown_feature() -> None:
    with pytest.raises(ValueError, match="tenure"):
        Drift(covariate={"tenure": 1.0})


@pytest.mark.parametrize("rate", [0.05, 0.3, 0.5])
def test_churn_rate_drift_gives_the_asked_share(rate: float) -> None:
    batch = generate(10_000, seed=404, drift=Drift(churn_rate=rate))
    assert len(batch) == 10_000
    assert batch[TARGET].mean() == pytest.approx(rate, abs=1e-4)
    assert batch["customer_id"].is_unique


def test_churn_rate_drift_keeps_what_churners_look_like(reference: pd.DataFrame) -> None:
    batch = generate(N, seed=404, drift=Drift(churn_rate=0.5))
    for col in ("tenure_months", "days_since_last_login"):
        ref_pos = reference.loc[reference[TARGET] == 1, col]
        new_pos = batch.loc[batch[TARGET] == 1, col]
        assert ks_pvalue(ref_pos, new_pos) > NOT_SIGNIFICANT / 2, col


def test_concept_drift_changes_labels_not_features() -> None:
    plain = generate(5_000, seed=505)
    drifted = generate(5_000, seed=505, drift=Drift(concept=0.8))
    pd.testing.assert_frame_equal(plain[NUMERIC + CATEGORICAL], drifted[NUMERIC + CATEGORICAL])
    assert (plain[TARGET] != drifted[TARGET]).mean() > 0.1


def test_concept_drift_keeps_feature_distributions(reference: pd.DataFrame) -> None:
    drifted = generate(N, seed=505, drift=Drift(concept=0.8))
    threshold = NOT_SIGNIFICANT / (len(NUMERIC) + len(CATEGORICAL))
    for col in NUMERIC:
        assert ks_pvalue(reference[col], drifted[col]) > threshold, col
    for col in CATEGORICAL:
        assert chi2_pvalue(reference[col], drifted[col]) > threshold, col


def test_concept_drift_costs_a_fitted_model_its_ranking(
    reference: pd.DataFrame, undrifted: pd.DataFrame, data_params: DataParams, params: Params
) -> None:
    train_params = TrainParams(**(params.train.model_dump() | {"n_estimators": 40}))
    model = build(data_params, train_params)
    fit_on = reference.head(10_000)
    model.fit(model_frame(fit_on, data_params), fit_on[TARGET])

    def auc(batch: pd.DataFrame) -> float:
        proba = model.predict_proba(model_frame(batch, data_params))[:, 1]
        return float(roc_auc_score(batch[TARGET], proba))

    drifted = generate(N, seed=505, drift=Drift(concept=0.8))
    assert auc(undrifted) > 0.75
    assert auc(undrifted) - auc(drifted) > 0.15


@pytest.fixture(scope="module")
def tenant_traffic() -> dict[str, pd.DataFrame]:
    return {t.id: t.traffic(N // 2) for t in EXAMPLE_TENANTS}


def test_there_are_two_example_tenants_with_their_own_seeds() -> None:
    assert [t.id for t in EXAMPLE_TENANTS] == ["acme", "globex"]
    assert example_tenant("globex").name == "Globex Corporation"
    with pytest.raises(UserError, match="no example tenant 'initech'"):
        example_tenant("initech")


def test_example_tenants_have_different_subscribers(
    tenant_traffic: dict[str, pd.DataFrame],
) -> None:
    acme, globex = tenant_traffic["acme"], tenant_traffic["globex"]
    for col in ("tenure_months", "age", "monthly_charges"):
        assert ks_pvalue(acme[col], globex[col]) < SIGNIFICANT, col
    for col in ("plan_tier", "contract_type"):
        assert chi2_pvalue(acme[col], globex[col]) < SIGNIFICANT, col
    assert acme["tenure_months"].mean() > globex["tenure_months"].mean() + 5


def test_acme_churns_for_other_reasons_than_the_population(
    tenant_traffic: dict[str, pd.DataFrame],
) -> None:
    """acme's label relation leans towards low usage (its `concept`); globex's does not."""

    def low_usage_lift(df: pd.DataFrame) -> float:
        low = df["avg_daily_usage_min"] < 45
        return float(df.loc[low, TARGET].mean() - df.loc[~low, TARGET].mean())

    assert low_usage_lift(tenant_traffic["acme"]) > 0.1
    assert abs(low_usage_lift(tenant_traffic["globex"])) < 0.03


def test_globex_alone_is_no_drift_from_the_training_population_and_acme_is_some(
    tenant_traffic: dict[str, pd.DataFrame],
    data_params: DataParams,
    monitor_params: MonitorParams,
) -> None:
    """globex is monitored against the shared model's reference: its normal traffic must
    not look like drift. acme's differs in some features (its own model's reference is its
    own data)."""
    training = generate(N, seed=42)
    globex = drift_core.drift(training, tenant_traffic["globex"], data_params, monitor_params)
    assert [c.column for c in globex.features if c.drifted] == []
    assert not globex.drift_detected
    alone = drift_core.drift(training, tenant_traffic["acme"], data_params, monitor_params)
    assert 0 < sum(c.drifted for c in alone.features) < len(alone.features) / 2


def test_tenant_traffic_is_seeded_per_batch_and_names_the_tenant() -> None:
    acme = example_tenant("acme")
    pd.testing.assert_frame_equal(acme.traffic(500), acme.traffic(500))
    assert not acme.traffic(500)[NUMERIC].equals(acme.traffic(500, batch=1)[NUMERIC])
    assert acme.traffic(500)["customer_id"].str.startswith("acme-").all()


def test_drift_on_tenant_traffic_adds_to_its_own_mix() -> None:
    globex = example_tenant("globex")
    plain = globex.traffic(N)
    drifted = globex.traffic(N, drift=Drift(covariate={"tenure_months": -0.5}, concept=0.8))
    assert drifted["tenure_months"].mean() < plain["tenure_months"].mean() - 3
    assert ks_pvalue(plain["age"], drifted["age"]) > NOT_SIGNIFICANT  # its mix stays
