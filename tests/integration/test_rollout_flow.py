"""The rollout flow on live traffic: a real PostgreSQL prediction log read as the flows role
(row-level security), a real (embedded) MLflow registry, Prefect's test harness, and a
paging webhook (the one stand-in: it is outside the system).

A thread plays the predictor while the flow polls: every 50 ms it reads the challenger's
weight and the aliases from the registry, as the predictor does on its alias poll, assigns
each new request a variant by the sticky hash, and logs the predictions with their labels
(the challenger's deliberately worse, or better, than the champion's).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from common import registry
from common.errors import UserError
from common.localpg import LocalPostgres
from common.registry import promotion, variants
from common.settings import get_settings
from common.store import Prediction, connect, create_staging, migrate, roles, tenants, write_items
from common.store.rows import Feedback
from flows import rollout as rollout_flow
from tests.integration.test_monitor_flow import Webhook
from tests.servers import PREFECT_STARTUP_TIMEOUT
from tests.workspace import ROOT

pytestmark = pytest.mark.integration

NAME = "churn-classifier"
TENANTS = ("default", "globex")  # the shared model serves both: the rollout reads both


@pytest.fixture(scope="module", autouse=True)
def harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=PREFECT_STARTUP_TIMEOUT):
        yield


@pytest.fixture(scope="module")
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.server.shutdown()


@dataclass
class Setup:
    client: MlflowClient
    admin_url: str
    project: Path
    champion: str
    challenger: str


def _params(project: Path, **rollout: Any) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["rollout"] = {
        **raw["rollout"],
        "steps": [10, 50, 100],
        "min_samples": 60,
        "min_labels": 60,
        "poll_seconds": 0.3,
        "step_timeout_seconds": 60,
        **rollout,
    }
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture
def setup(
    tmp_path: Path, postgres: LocalPostgres, webhook: Webhook, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Setup]:
    """A fresh prediction database (read by the flow as the flows role), an embedded registry
    with champion v1 (promoted through the one path) and challenger v2, and params."""
    postgres.start()
    db = f"rollout_{uuid.uuid4().hex[:12]}"
    postgres.create_database(db)
    admin = postgres.url(db)
    migrate(admin)
    roles.enable_login(admin, roles.FLOWS)
    for tenant in ("globex", "acme"):
        tenants.add_tenant(admin, tenant)
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / ".mlops"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MODEL_NAME", NAME)
    monkeypatch.setenv("DATABASE_URL", roles.role_url(admin, roles.FLOWS))
    monkeypatch.setenv("MONITOR_WEBHOOK_URL", webhook.url)
    get_settings.cache_clear()
    client = registry.connect(get_settings())
    client.create_registered_model(NAME)
    source = (tmp_path / "placeholder").resolve().as_uri()
    v1, v2 = (str(client.create_model_version(NAME, source=source).version) for _ in "12")
    promotion.move_champion(client, NAME, v1, by="test", reason="first champion")
    client.set_registered_model_alias(NAME, registry.CHALLENGER, v2)
    project = tmp_path / "project"
    project.mkdir()
    _params(project)
    yield Setup(client, admin, project, v1, v2)
    get_settings.cache_clear()


class Traffic:
    """The predictor's stand-in: requests assigned by the live weight, logged with labels."""

    def __init__(
        self,
        setup: Setup,
        accuracy: dict[str, float],
        *,
        model: str = NAME,
        tenants: tuple[str, ...] = TENANTS,
        batch: int = 60,
    ) -> None:
        self.setup, self.accuracy, self.batch = setup, accuracy, batch
        self.model, self.tenants = model, tenants
        self.stop = threading.Event()
        self.weights: set[float] = set()
        self.rng = np.random.default_rng(7)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)

    def _versions(self) -> tuple[float, dict[str, str]]:
        client = self.setup.client
        weight = variants.current_weight(client, self.model)
        found = {
            a: registry.version_by_alias(client, self.model, a) for a in variants.VARIANT_ALIASES
        }
        return weight, {a: str(mv.version) for a, mv in found.items() if mv is not None}

    def _request(self, tenant: str, weight: float, versions: dict[str, str]) -> list[Any]:
        key = str(uuid.uuid4())
        variant = variants.assign(tenant, key, weight) if "challenger" in versions else "champion"
        label = int(self.rng.integers(0, 2))
        right = self.rng.random() < self.accuracy[variant]
        predicted = label if right else 1 - label
        p1 = float(np.clip((0.75 if predicted else 0.25) + self.rng.normal(0, 0.1), 0.01, 0.99))
        now = datetime.now(UTC)
        return [
            Prediction(
                key,
                now,
                self.model,
                versions[variant],
                {"x": 1.0},
                str(predicted),
                {"0": 1 - p1, "1": p1},
                float(5 + self.rng.gamma(2.0, 1.0)),
                tenant,
                variant,
            ),
            Feedback(key, str(label), now, tenant),
        ]

    def _run(self) -> None:
        with connect(self.setup.admin_url) as conn:
            create_staging(conn)
            while not self.stop.is_set():
                weight, versions = self._versions()
                self.weights.add(weight)
                items = [
                    item
                    for i in range(self.batch)
                    for item in self._request(self.tenants[i % len(self.tenants)], weight, versions)
                ]
                write_items(conn, items)
                self.stop.wait(0.05)


def _tags(setup: Setup, version: str) -> dict[str, str]:
    return dict(setup.client.get_model_version(NAME, version).tags)


def _alias(setup: Setup, alias: str) -> str | None:
    found = registry.version_by_alias(setup.client, NAME, alias)
    return None if found is None else str(found.version)


def _run(setup: Setup, tenant: str | None = None) -> rollout_flow.Outcome:
    return rollout_flow.rollout(tenant=tenant, project_dir=str(setup.project))


def test_a_challenger_worse_on_live_labels_is_rolled_back_and_paged(
    setup: Setup, webhook: Webhook
) -> None:
    before = len(webhook.bodies)
    with Traffic(setup, {"champion": 0.9, "challenger": 0.55}):
        outcome = _run(setup)

    assert outcome.outcome == "rolled back"
    assert outcome.metric in ("accuracy", "roc_auc")
    assert _alias(setup, registry.CHAMPION) == setup.champion  # never moved
    assert _alias(setup, registry.CHALLENGER) is None
    assert variants.current_weight(setup.client, NAME) == 0
    tags = _tags(setup, setup.challenger)
    assert tags["promote.decision"] == "rolled back"
    assert outcome.metric in tags["promote.reason"]
    assert tags["rollout.outcome"] == "rolled back"
    assert tags["rollout.champion"] == setup.champion
    step = json.loads(tags["rollout.step.1"])
    assert (step["weight"], step["action"]) == (10, "roll back")
    assert step["challenger"]["labelled"] >= 60
    assert step["challenger"]["accuracy"] < step["champion"]["accuracy"]
    # the page: one POST naming the metric and the versions
    assert len(webhook.bodies) == before + 1
    page = webhook.bodies[-1]
    assert page["event"] == rollout_flow.ROLLED_BACK_EVENT
    assert page["metric"] == outcome.metric
    assert (page["champion_version"], page["challenger_version"]) == (
        setup.champion,
        setup.challenger,
    )
    assert page["worse_by"] > page["margin"]
    assert page["p_value"] < 0.05


def test_a_better_challenger_is_ramped_and_promoted_through_the_one_path(
    setup: Setup, webhook: Webhook, capsys: pytest.CaptureFixture[str]
) -> None:
    before = len(webhook.bodies)
    with Traffic(setup, {"champion": 0.8, "challenger": 0.95}) as traffic:
        outcome = _run(setup)

    assert outcome.outcome == "promoted"
    assert [s.weight for s in outcome.steps] == [10, 50, 100]
    assert {10, 50, 100} <= traffic.weights  # the "predictor" saw every step
    assert _alias(setup, registry.CHAMPION) == setup.challenger
    assert _alias(setup, registry.CHALLENGER) is None
    assert variants.current_weight(setup.client, NAME) == 0
    tags = _tags(setup, setup.challenger)
    assert tags["alias.champion.previous"] == setup.champion
    assert tags["promote.decision"] == "promoted"
    assert tags["promote.decided_by"].startswith("rollout flow")
    evidence = json.loads(tags["alias.champion.evidence"])
    assert evidence["decided_in"] == "rollout flow"
    assert [s["weight"] for s in evidence["steps"]] == [10, 50, 100]
    assert evidence["challenger"]["version"] == setup.challenger
    assert evidence["challenger"]["requests"] >= 60
    assert evidence["champion"]["accuracy"] < evidence["challenger"]["accuracy"]
    assert {c["metric"] for c in evidence["comparisons"]} >= {"error_rate", "accuracy"}
    for n in (1, 2, 3):
        assert json.loads(tags[f"rollout.step.{n}"])["action"] in ("advance", "promote")
    assert len(webhook.bodies) == before  # nobody paged
    printed = capsys.readouterr().out
    assert "step 3/3 at 100%: promote" in printed
    assert "| requests | " in printed
    # make rollback's path works after a rollout's promotion
    move = promotion.rollback(setup.client, NAME, by="test", reason="make rollback")
    assert (move.replaced, move.version) == (setup.challenger, setup.champion)
    assert _alias(setup, registry.CHAMPION) == setup.champion


def test_a_tenants_rollout_reads_its_own_rows_under_its_own_policy(setup: Setup) -> None:
    raw = yaml.safe_load((setup.project / "params.yaml").read_text())
    raw["tenants"]["acme"]["rollout"] = {"steps": [20, 100]}
    (setup.project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    acme = f"{NAME}.acme"
    setup.client.create_registered_model(acme)
    source = (setup.project / "placeholder").resolve().as_uri()
    v1, v2 = (str(setup.client.create_model_version(acme, source=source).version) for _ in "12")
    promotion.move_champion(setup.client, acme, v1, by="test", reason="acme's first")
    setup.client.set_registered_model_alias(acme, registry.CHALLENGER, v2)
    good = {"champion": 0.8, "challenger": 0.95}
    # rows under acme's model name from another tenant, its challenger always wrong: a
    # rollout that read them would roll back
    noise = {"champion": 0.8, "challenger": 0.0}
    with (
        Traffic(setup, good, model=acme, tenants=("acme",)),
        Traffic(setup, noise, model=acme, tenants=("globex",)),
    ):
        outcome = _run(setup, tenant="acme")

    assert outcome.outcome == "promoted"
    assert outcome.model_name == acme
    assert [s.weight for s in outcome.steps] == [20, 100]
    assert str(setup.client.get_model_version_by_alias(acme, registry.CHAMPION).version) == v2
    assert _alias(setup, registry.CHAMPION) == setup.champion  # the shared model untouched


def test_without_enough_traffic_the_rollout_is_held_not_condemned(setup: Setup) -> None:
    _params(setup.project, step_timeout_seconds=2)
    outcome = _run(setup)  # no traffic at all

    assert outcome.outcome == "held"
    assert "no verdict within 2 s at 10%" in outcome.reason
    assert "challenger 0/60 requests" in outcome.reason
    assert _alias(setup, registry.CHAMPION) == setup.champion
    assert _alias(setup, registry.CHALLENGER) == setup.challenger  # kept for another try
    assert variants.current_weight(setup.client, NAME) == 0
    tags = _tags(setup, setup.challenger)
    assert (tags["promote.decision"], tags["rollout.outcome"]) == ("held", "held")
    assert json.loads(tags["rollout.step.1"])["action"] == "hold"


def test_the_cli_without_a_challenger_says_so_in_one_line(setup: Setup) -> None:
    setup.client.delete_registered_model_alias(NAME, registry.CHALLENGER)
    with pytest.raises(UserError, match="has no 'challenger' alias: nothing to roll out"):
        rollout_flow.main(["--project-dir", str(setup.project)])
    with pytest.raises(UserError, match="tenant 'nobody' has no model of its own"):
        rollout_flow.main(["--tenant", "nobody", "--project-dir", str(setup.project)])


def test_a_challenger_the_gate_rejected_is_not_rolled_out(setup: Setup) -> None:
    promotion.record_decision(
        setup.client, NAME, setup.challenger, decision="rejected", by="gate", reason="worse AUC"
    )
    with pytest.raises(UserError, match=r"v2 \(challenger\) was rejected: worse AUC"):
        rollout_flow.main(["--project-dir", str(setup.project)])
    assert variants.current_weight(setup.client, NAME) == 0


def test_a_rollout_that_fails_leaves_no_challenger_on_traffic(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = setup.admin_url.rsplit("/", 1)[0] + "/no_such_database"
    monkeypatch.setenv("DATABASE_URL", gone)
    get_settings.cache_clear()

    with pytest.raises(Exception, match="no_such_database"):
        _run(setup)

    assert variants.current_weight(setup.client, NAME) == 0
    reason = setup.client.get_registered_model(NAME).tags[variants.WEIGHT_REASON_TAG]
    assert reason.startswith("rollout stopped by an error")
    assert _alias(setup, registry.CHAMPION) == setup.champion
