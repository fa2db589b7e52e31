"""The flows under Prefect's test harness: pipeline's stages and failures, promote's decisions.

`pipeline` runs on a tiny DVC project whose stages are one script (fast, no ML); `promote`
and `rollback` run against an embedded MLflow registry with the scoring replaced by
fixed metrics, so the tests are about the decisions, the aliases and the tags.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import ArtifactSort
from prefect.flow_runs import resume_flow_run
from prefect.testing.utilities import prefect_test_harness

from common import dvc_pipeline, registry
from common.errors import UserError, run_cli
from common.registry import promotion
from common.settings import get_settings
from flows import fanout
from flows.monitor import monitor_tenants
from flows.pipeline import pipeline
from flows.promote import main as promote_cli
from flows.promote import promote, rollback
from flows.retrain import retrain, retrain_tenants
from models import promote as policy
from tests.servers import PREFECT_STARTUP_TIMEOUT
from tests.workspace import ROOT

NAME = "churn-classifier"

STEP = """\
import json, sys
from pathlib import Path

name = sys.argv[1]
with open("order.log", "a") as log:
    log.write(name + "\\n")
print(f"{name}: working")
if name == "prepare" and Path("FLAKY").exists() and not Path("crashed").exists():
    Path("crashed").touch()
    raise RuntimeError("connection reset")
if name == "validate" and Path("BAD").exists():
    print("error: validation failed: column age: 3 values above max 120", file=sys.stderr)
    print("(rows 1, 4, 9).", file=sys.stderr)
    sys.exit(1)
if name.startswith(("register", "tenant-register@")):
    tenant = name.partition("@")[2]
    sub = f"/tenants/{tenant}" if tenant else ""
    for d in ("reports", "metrics"):
        Path(d + sub).mkdir(parents=True, exist_ok=True)
    Path(f"reports{sub}/train.json").write_text(json.dumps({"run_id": "abc123"}))
    Path(f"metrics{sub}/holdout.json").write_text(json.dumps({"roc_auc": 0.81, "rows": 10}))
    Path(f"reports{sub}/register.json").write_text(json.dumps({
        "model_name": "churn-classifier" + (f".{tenant}" if tenant else ""), "version": "7",
        "promoted": True, "reason": "no champion yet"}))
"""


@pytest.fixture(scope="module", autouse=True)
def harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=PREFECT_STARTUP_TIMEOUT):
        yield


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A DVC project whose stages (prepare, validate, register) all run one small script."""
    (tmp_path / "step.py").write_text(STEP)
    stages = {
        name: {"cmd": f"{sys.executable} step.py {name}", "always_changed": True}
        for name in ("prepare", "validate", "register")
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    subprocess.run(
        [sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True
    )
    return tmp_path


@pytest.fixture
def tenant_project(project: Path) -> Path:
    """The same project plus a chain per tenant of params.yaml (acme and globex)."""
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    for name in ("prepare", "register"):
        spec["stages"][f"tenant-{name}"] = {
            "foreach": "${tenants}",
            "do": {
                "cmd": f"{sys.executable} step.py tenant-{name}@${{key}}",
                "always_changed": True,
            },
        }
    (project / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tenants"] = {t: {"source": {"path": f"{t}.csv"}} for t in ("acme", "globex")}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project


def _order(project: Path) -> list[str]:
    return (project / "order.log").read_text().split()


def test_stages_come_from_dvc_yaml_in_its_order() -> None:
    assert dvc_pipeline.stages(ROOT) == [
        "registry-target",
        "generate",
        "prepare",
        "validate",
        "train",
        "evaluate",
        "register",
    ]


def test_a_tenants_stages_are_its_own_chain_in_dvc_yaml_order() -> None:
    assert dvc_pipeline.stages(ROOT, "acme") == [
        "registry-target",  # a change of registry reaches the tenant's train/register too
        "tenant-snapshot@acme",
        "tenant-prepare@acme",
        "tenant-validate@acme",
        "tenant-train@acme",
        "tenant-evaluate@acme",
        "tenant-register@acme",
    ]


@pytest.mark.parametrize(
    ("tenants", "expected"),
    [
        ({}, []),
        (
            {"acme": {"source": {"path": "a.csv"}}, "b-2": {"source": {"path": "b.csv"}}},
            ["acme", "b-2"],
        ),
    ],
    ids=["no-tenants", "two-tenants"],
)
def test_dvc_makes_a_chain_per_tenant_of_params_yaml_and_none_without(
    tmp_path: Path, tenants: dict[str, Any], expected: list[str]
) -> None:
    """DVC's own reading of dvc.yaml's foreach groups, as `dvc repro` sees them."""
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text()) | {"tenants": tenants}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(
        [sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True
    )
    listed = subprocess.run(
        [sys.executable, "-m", "dvc", "stage", "list", "--name-only"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()

    shared = dvc_pipeline.stages(tmp_path)
    chains = [dvc_pipeline.stages(tmp_path, t)[1:] for t in expected]  # after registry-target
    assert listed == shared + [s for group in zip(*chains, strict=True) for s in group]
    assert all(len(chain) == 6 for chain in chains)


def test_a_tenant_without_a_model_of_its_own_is_named_with_the_ones_there_are() -> None:
    with pytest.raises(UserError, match=r"tenant 'globex' has no model of its own .*\['acme'\]"):
        dvc_pipeline.stages(ROOT, "globex")


def test_the_pipeline_flow_runs_only_the_tenants_chain_and_names_its_model(
    tenant_project: Path,
) -> None:
    result = pipeline(project_dir=str(tenant_project), tenant="acme")

    assert _order(tenant_project) == ["tenant-prepare@acme", "tenant-register@acme"]
    assert (result.model_name, result.tenant, result.version) == (
        "churn-classifier.acme",
        "acme",
        "7",
    )
    assert dvc_pipeline.summary(tenant_project, "acme") == result
    assert "churn-classifier.acme v7 (tenant acme's own model)" in dvc_pipeline.summary_markdown(
        result, "sqlite:///x.db"
    )


def test_the_shared_pipeline_runs_no_tenants_stage(tenant_project: Path) -> None:
    result = pipeline(project_dir=str(tenant_project))

    assert _order(tenant_project) == ["prepare", "validate", "register"]
    assert (result.model_name, result.tenant) == ("churn-classifier", None)


def test_the_pipeline_flow_runs_each_stage_in_order_and_publishes_a_summary(project: Path) -> None:
    result = pipeline(project_dir=str(project))

    assert _order(project) == ["prepare", "validate", "register"]
    assert (result.version, result.promoted, result.metrics) == ("7", True, {"roc_auc": 0.81})
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["pipeline-summary"])),
            sort=ArtifactSort.CREATED_DESC,  # this run's: other tests publish theirs too
        )
    assert artifacts
    text = str(artifacts[0].data)
    assert "churn-classifier v7" in text
    assert "promoted to **champion**" in text
    assert "| roc_auc | 0.8100 |" in text
    assert "abc123" in text


def test_a_validation_failure_fails_the_run_with_its_error_and_is_not_retried(
    project: Path,
) -> None:
    (project / "BAD").touch()

    state = pipeline(project_dir=str(project), return_state=True)

    assert state.is_failed()
    assert "validation failed: column age: 3 values above max 120 (rows 1, 4, 9)." in str(
        state.message
    )
    assert _order(project) == ["prepare", "validate"]


def test_a_crashing_stage_is_retried(project: Path) -> None:
    (project / "FLAKY").touch()

    pipeline(project_dir=str(project))

    assert _order(project) == ["prepare", "prepare", "validate", "register"]


def test_a_dvc_remote_is_detected(project: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    assert not dvc_pipeline.has_remote(project)
    remote = tmp_path_factory.mktemp("remote")
    subprocess.run(
        [sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(remote)],
        cwd=project,
        check=True,
    )
    assert dvc_pipeline.has_remote(project)


# promote / rollback


SCORES: dict[str, dict[str, float]] = {}


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, MlflowClient]]:
    """A project dir with params.yaml and a holdout, an empty embedded registry, fixed scores."""
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / ".mlops"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    get_settings.cache_clear()
    (tmp_path / "data/prepared").mkdir(parents=True)
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "data/prepared/holdout.parquet")
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.setattr(policy, "_score_version", lambda mv, _c, _h, _d: SCORES[str(mv.version)])
    client = registry.connect(get_settings())
    client.create_registered_model(NAME)
    yield tmp_path, client
    get_settings.cache_clear()


def _policy(project: Path, **promote: Any) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["promote"] = {"improve": {"roc_auc": 0.01}, "no_worse": {"log_loss": 0.01}} | promote
    (project / "params.yaml").write_text(yaml.safe_dump(params))


def _version(client: MlflowClient, roc_auc: float, log_loss: float = 0.4) -> str:
    source = (Path(get_settings().mlops_home) / "placeholder").resolve().as_uri()
    mv = client.create_model_version(NAME, source=source, run_id=None)
    SCORES[str(mv.version)] = {"roc_auc": roc_auc, "log_loss": log_loss}
    return str(mv.version)


def _with_champion_and_challenger(client: MlflowClient, challenger_auc: float) -> tuple[str, str]:
    old, new = _version(client, 0.80), _version(client, challenger_auc)
    client.set_registered_model_alias(NAME, registry.CHAMPION, old)
    client.set_registered_model_alias(NAME, registry.CHALLENGER, new)
    return old, new


def _champion(client: MlflowClient) -> str:
    return str(client.get_model_version_by_alias(NAME, registry.CHAMPION).version)


def _tags(client: MlflowClient, version: str) -> dict[str, str]:
    return dict(client.get_model_version(NAME, version).tags)


def test_promote_moves_champion_when_the_policy_passes(
    store: tuple[Path, MlflowClient],
) -> None:
    project, client = store
    _policy(project)
    old, new = _with_champion_and_challenger(client, 0.83)

    assert promote(project_dir=str(project)) is True

    assert _champion(client) == new
    tags = _tags(client, new)
    assert tags["promote.decision"] == "promoted"
    assert tags["promote.decided_by"].startswith("promote policy (prefect flow run ")
    assert "gain +0.0300 >= required 0.01" in tags["promote.reason"]
    assert tags["promote.decided_at"]
    assert tags[policy.PREVIOUS] == old
    assert registry.version_by_alias(client, NAME, registry.CHALLENGER) is None


def test_promote_keeps_champion_when_the_policy_fails(store: tuple[Path, MlflowClient]) -> None:
    project, client = store
    _policy(project)
    old, new = _with_champion_and_challenger(client, 0.805)

    assert promote(project_dir=str(project)) is False

    assert _champion(client) == old
    assert _tags(client, new)["promote.decision"] == "rejected"
    assert "< required 0.01" in _tags(client, new)["promote.reason"]


def test_rollback_returns_champion_to_the_version_it_replaced(
    store: tuple[Path, MlflowClient],
) -> None:
    project, client = store
    _policy(project)
    old, new = _with_champion_and_challenger(client, 0.83)
    promote(project_dir=str(project))

    assert rollback(reason="latency regression") == old

    assert _champion(client) == old
    assert _tags(client, new)["promote.decision"] == "rolled back"
    assert _tags(client, new)["promote.reason"] == "latency regression"
    assert _tags(client, old)["alias.champion.reason"] == "latency regression"


def test_rollback_without_an_earlier_champion_fails(store: tuple[Path, MlflowClient]) -> None:
    _, client = store
    client.set_registered_model_alias(NAME, registry.CHAMPION, _version(client, 0.8))

    state = rollback(return_state=True)

    assert state.is_failed()
    assert "no earlier champion" in str(state.message)


def test_promote_records_the_evidence_the_flow_decided_on(
    store: tuple[Path, MlflowClient],
) -> None:
    project, client = store
    _policy(project)
    old, new = _with_champion_and_challenger(client, 0.83)

    promote(project_dir=str(project))

    evidence = json.loads(_tags(client, new)["alias.champion.evidence"])
    assert evidence["challenger"] == {"version": new, "metrics": SCORES[new]}
    assert evidence["champion"] == {"version": old, "metrics": SCORES[old]}
    assert evidence["policy"]["improve"] == {"roc_auc": 0.01}
    assert "gain +0.0300" in evidence["verdict"]


def test_a_second_rollback_walks_further_back_then_says_there_is_nothing_left(
    store: tuple[Path, MlflowClient],
) -> None:
    project, client = store
    _policy(project)
    v1, v2 = _with_champion_and_challenger(client, 0.83)
    promote(project_dir=str(project))
    v3 = _version(client, 0.90)
    client.set_registered_model_alias(NAME, registry.CHALLENGER, v3)
    promote(project_dir=str(project))

    assert rollback(reason="first") == v2
    assert rollback(reason="second") == v1
    state = rollback(return_state=True)

    assert state.is_failed()
    assert "no earlier champion" in str(state.message)
    assert _champion(client) == v1
    assert [_tags(client, v)["promote.decision"] for v in (v1, v2, v3)] == [
        "restored",
        "rolled back",
        "rolled back",
    ]


def test_make_rollback_says_what_moved_and_where_the_next_one_would_go(
    store: tuple[Path, MlflowClient], capsys: pytest.CaptureFixture[str]
) -> None:
    project, client = store
    _policy(project)
    old, new = _with_champion_and_challenger(client, 0.83)
    promote(project_dir=str(project))

    promote_cli(["rollback"])

    out = capsys.readouterr().out
    assert f"{NAME}: champion v{new} -> v{old}" in out
    assert "no earlier champion left" in out
    assert _champion(client) == old


def test_make_rollback_without_an_earlier_champion_is_one_line_not_a_traceback(
    store: tuple[Path, MlflowClient], capsys: pytest.CaptureFixture[str]
) -> None:
    _, client = store
    client.set_registered_model_alias(NAME, registry.CHAMPION, _version(client, 0.8))

    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: promote_cli(["rollback"]))

    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {NAME} v1 has no alias.champion.previous tag")
    assert "Traceback" not in err


def test_make_rollback_for_a_tenant_moves_only_its_own_model(
    store: tuple[Path, MlflowClient], capsys: pytest.CaptureFixture[str]
) -> None:
    _, client = store
    acme = f"{NAME}.acme"
    client.create_registered_model(acme)
    source = (Path(get_settings().mlops_home) / "placeholder").resolve().as_uri()
    v1, v2 = (str(client.create_model_version(acme, source=source).version) for _ in "12")
    client.set_registered_model_alias(acme, registry.CHAMPION, v1)
    promotion.move_champion(client, acme, v2, by="test", reason="better on acme's data")
    shared = _version(client, 0.8)
    client.set_registered_model_alias(NAME, registry.CHAMPION, shared)

    promote_cli(["rollback", "--tenant", "acme"])

    assert f"{acme}: champion v{v2} -> v{v1}" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias(acme, registry.CHAMPION).version) == v1
    assert _champion(client) == shared


def test_make_rollback_points_at_the_tenants_that_can_roll_back_when_the_shared_one_cannot(
    store: tuple[Path, MlflowClient], capsys: pytest.CaptureFixture[str]
) -> None:
    _, client = store
    acme = f"{NAME}.acme"
    client.create_registered_model(acme)
    source = (Path(get_settings().mlops_home) / "placeholder").resolve().as_uri()
    for _ in "12":
        v = str(client.create_model_version(acme, source=source).version)
        promotion.move_champion(client, acme, v, by="tenant-register@acme", reason="gate")
    client.set_registered_model_alias(NAME, registry.CHAMPION, _version(client, 0.8))

    with pytest.raises(SystemExit):
        run_cli(lambda: promote_cli(["rollback"]))

    err = capsys.readouterr().err
    assert "no earlier champion to return to" in err
    assert "can roll back: acme (v2 -> v1); e.g. make rollback TENANT=acme" in err


# human approval


def _paused_run(timeout: float = 30) -> UUID:
    paused = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
    )
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(flow_run_filter=paused)
            if runs:
                return runs[0].id
            time.sleep(0.5)
    raise AssertionError("no paused flow run appeared")


def _promote_in_thread(project: Path) -> tuple[threading.Thread, list[bool]]:
    result: list[bool] = []
    thread = threading.Thread(
        target=lambda: result.append(promote(project_dir=str(project))), daemon=True
    )
    thread.start()
    return thread, result


def test_an_approved_promotion_moves_champion_and_records_the_reviewer(
    store: tuple[Path, MlflowClient],
) -> None:
    project, client = store
    _policy(project, require_approval=True, approval_timeout_seconds=60)
    _, new = _with_champion_and_challenger(client, 0.83)
    thread, result = _promote_in_thread(project)

    resume_flow_run(
        _paused_run(), run_input={"approve": True, "reviewer": "alice", "comment": "ok"}
    )
    thread.join(60)

    assert result == [True]
    assert _champion(client) == new
    tags = _tags(client, new)
    assert tags["promote.decided_by"] == "alice (prefect UI)"
    assert tags["promote.reason"].startswith("approved by alice: ok; roc_auc")


def test_a_rejected_promotion_keeps_champion(store: tuple[Path, MlflowClient]) -> None:
    project, client = store
    _policy(project, require_approval=True, approval_timeout_seconds=60)
    old, new = _with_champion_and_challenger(client, 0.83)
    thread, result = _promote_in_thread(project)

    resume_flow_run(_paused_run(), run_input={"approve": False, "reviewer": "bob"})
    thread.join(60)

    assert result == [False]
    assert _champion(client) == old
    assert _tags(client, new)["promote.decision"] == "rejected"
    assert _tags(client, new)["promote.reason"].startswith("rejected by bob; roc_auc")


def test_an_unanswered_approval_times_out_without_promotion(
    store: tuple[Path, MlflowClient],
) -> None:
    project, client = store
    _policy(project, require_approval=True, approval_timeout_seconds=1)
    old, new = _with_champion_and_challenger(client, 0.83)

    assert promote(project_dir=str(project)) is False

    assert _champion(client) == old
    assert _tags(client, new)["promote.reason"].startswith("no approval within 1 s")


def test_retrain_stops_after_the_pipeline_when_the_gate_already_promoted(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLOPS_HOME", str(project / ".mlops"))  # no prediction log to export
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # exported by an earlier test
    get_settings.cache_clear()
    (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    client = registry.connect(get_settings())
    client.create_registered_model(NAME)
    for _ in range(7):  # the fake register stage reports version 7
        client.create_model_version(NAME, source=(project / "m").as_uri(), run_id=None)

    assert retrain(project_dir=str(project)) is True

    assert _tags(client, "7")["data.production_rows"] == "0"
    get_settings.cache_clear()
    assert _order(project) == ["prepare", "validate", "register"]


# per-tenant fan-out


@pytest.fixture
def queued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """A project with tenants acme and globex; every run_deployment call, recorded."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tenants"] = {t: {"source": {"path": f"data/{t}.parquet"}} for t in ("acme", "globex")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    calls: list[dict[str, Any]] = []

    def run_deployment(name: str, **options: Any) -> FlowRun:
        calls.append({"deployment": name, **options})
        return FlowRun(flow_id=uuid4(), name=options["flow_run_name"])

    monkeypatch.setattr(fanout, "run_deployment", run_deployment)
    return calls


def test_monitor_tenants_queues_the_shared_model_and_each_tenant_without_waiting(
    queued: list[dict[str, Any]],
) -> None:
    ids = monitor_tenants(window_hours=2.0)

    assert len(set(ids)) == 3
    assert [(c["deployment"], c["parameters"]["tenant"], c["timeout"]) for c in queued] == [
        ("monitor/monitor", None, 0),
        ("monitor/monitor", "acme", 0),
        ("monitor/monitor", "globex", 0),
    ]
    assert [c["flow_run_name"] for c in queued] == [
        "monitor-shared",
        "monitor-acme",
        "monitor-globex",
    ]
    assert queued[1]["tags"] == ["tenant:acme"]
    assert {c["parameters"]["window_hours"] for c in queued} == {2.0}


def test_retrain_tenants_queues_one_retrain_per_tenant_with_a_model_of_its_own(
    queued: list[dict[str, Any]], tmp_path: Path
) -> None:
    retrain_tenants(project_dir=str(tmp_path))
    retrain_tenants(project_dir=str(tmp_path), tenants=["globex"])

    assert [(c["deployment"], c["parameters"]) for c in queued] == [
        ("retrain/retrain", {"project_dir": str(tmp_path), "tenant": "acme"}),
        ("retrain/retrain", {"project_dir": str(tmp_path), "tenant": "globex"}),
        ("retrain/retrain", {"project_dir": str(tmp_path), "tenant": "globex"}),
    ]
