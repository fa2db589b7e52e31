"""dvc.yaml, params.yaml, common/paths.py, models/, flows/ and prefect.yaml use the same words.

A dvc.yaml stage is a module of models/ and reads its own params.yaml section; a tenant's
stage (`tenant-<stage>@<id>`, a foreach group over params.yaml `tenants`) runs the same
module with `--tenant` on `paths.layout(<id>)`'s files; a Prefect deployment is a flow of
flows/ with the same name. The exceptions are listed here, each with
its reason, and the tests fail if one stops being needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from common import paths
from common.params import Params
from tests.workspace import ROOT

STAGES = ["generate", "prepare", "validate", "train", "evaluate", "register"]
TARGET_STAGE = "registry-target"
"""Not a step of the loop: which registry the steps write to (common.registry_target), run
first on every repro; the shared and every tenant's train/register depend on its file."""
WRITES_TO_REGISTRY = {"train", "register"}
TENANT_STAGES = ["snapshot", "prepare", "validate", "train", "evaluate", "register"]
"""A tenant's chain: its own data snapshotted first, then the shared model's steps."""
KEY = "${key}"
TENANT = paths.layout(KEY)
"""A tenant's files as dvc.yaml's foreach groups spell them."""
TENANT_OUTS = {
    "snapshot": {TENANT.SNAPSHOT},
    "prepare": {TENANT.TRAIN, TENANT.HOLDOUT, TENANT.REFERENCE},
    "validate": {TENANT.VALIDATION_REPORT},
    "train": {TENANT.TRAIN_RUN},
    "evaluate": {TENANT.METRICS, TENANT.CONFUSION, TENANT.ROC},
    "register": {TENANT.REGISTER_REPORT},
}
TENANT_SOURCES = {Path("data/sources"), TENANT.PRODUCTION}
"""What a tenant's chain reads besides its own earlier outputs: local source files (the
example tenant's from `generate`) and the tenant's labelled production rows."""
OUTS = {
    "prepare": {paths.TRAIN, paths.HOLDOUT, paths.REFERENCE},
    "validate": {paths.VALIDATION_REPORT},
    "train": {paths.TRAIN_RUN},
    "evaluate": {paths.METRICS, paths.CONFUSION, paths.ROC},
    "register": {paths.REGISTER_REPORT},
}
"""What each stage writes, in paths.py's names; dvc.yaml must declare exactly these."""

DVC: dict[str, Any] = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PARAMS: dict[str, Any] = yaml.safe_load((ROOT / "params.yaml").read_text())
DEPLOYMENTS: dict[str, Any] = {
    d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
}

SHARED_SECTIONS = {"data"}
TENANTS_SECTION = "tenants"
"""Each tenant's source and overrides: its chain's stages read `tenants.<id>`."""
"""The data contract (paths, columns, label): every stage that touches rows reads it."""
BORROWED_SECTIONS = {
    # The gate IS the promotion policy: `register` judges a new version against champion
    # with the very rules the `promote` flow applies, so there is one `promote:` section,
    # not a `register:` copy that could drift from it.
    ("register", "promote"),
    # ... and whether a winner goes straight to champion or first through a canary.
    ("register", "rollout"),
    # train writes the prediction columns under the names that monitoring reads.
    ("train", "monitor"),
}
"""(stage, section): a stage that reads another step's params section, and why."""
FLOW_MODULES = {
    "rollback": "promote",
    "promote_environment": "promote",
    "monitor_tenants": "monitor",
    "retrain_tenants": "retrain",
}
"""Deployments whose flow lives in another flow's module: rollback undoes what promote did;
the fan-outs queue runs of the flow beside them, one per tenant."""


def _names(entries: list[Any]) -> set[Path]:
    """Paths of a deps/outs/metrics/plots list, whose items are strings or {path: options}."""
    found = set()
    for entry in entries:
        found |= {Path(entry)} if isinstance(entry, str) else {Path(k) for k in entry}
    return found


def _spec(stage: str) -> dict[str, Any]:
    """A stage's definition; a foreach group's (`tenant-<stage>`) is its `do:`."""
    spec: dict[str, Any] = DVC[stage]
    return spec["do"] if "foreach" in spec else spec


def outs(stage: str) -> set[Path]:
    spec = _spec(stage)
    return _names(spec.get("outs", []) + spec.get("metrics", []) + spec.get("plots", []))


def deps(stage: str) -> set[Path]:
    return _names(_spec(stage).get("deps", []))


def group(stage: str) -> str:
    return f"tenant-{stage}"


def test_stages_are_the_loop_in_order() -> None:
    assert list(DVC) == [TARGET_STAGE, *STAGES] + [group(s) for s in TENANT_STAGES]


def test_the_registry_target_is_checked_every_repro_and_read_by_what_writes_there() -> None:
    assert DVC[TARGET_STAGE]["always_changed"] is True
    assert DVC[TARGET_STAGE]["cmd"] == "python -m common.registry_target"
    assert outs(TARGET_STAGE) == {paths.REGISTRY_TARGET}
    for stage in STAGES:
        reads = paths.REGISTRY_TARGET in deps(stage)
        assert reads == (stage in WRITES_TO_REGISTRY), stage
        if stage in TENANT_STAGES:
            assert (paths.REGISTRY_TARGET in deps(group(stage))) == reads, group(stage)


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_runs_its_own_module(stage: str) -> None:
    assert DVC[stage]["cmd"].split()[:3] == ["python", "-m", f"models.{stage}"]
    assert Path(f"models/{stage}.py") in deps(stage)
    assert (ROOT / "models" / f"{stage}.py").is_file()


@pytest.mark.parametrize("stage", list(OUTS))
def test_stage_outputs_match_common_paths(stage: str) -> None:
    assert outs(stage) == OUTS[stage]


def test_every_path_in_common_paths_is_in_the_pipeline() -> None:
    declared = {value for value in vars(paths).values() if isinstance(value, Path)}
    files = {p for p in declared if p.suffix}
    assert files <= set().union(*(outs(s) for s in [TARGET_STAGE, *STAGES]))
    assert {p.parent for p in OUTS["prepare"]} == {paths.PREPARED}


def test_stages_depend_only_on_earlier_outputs_or_sources() -> None:
    produced: set[Path] = outs(TARGET_STAGE)
    for stage in STAGES:
        for dep in deps(stage):
            if "${" in str(dep) or dep.parts[0] in ("models", "common"):
                continue
            assert dep in produced, f"{stage} depends on {dep}, which no earlier stage writes"
        produced |= outs(stage)


def test_generate_writes_the_default_data_path(params: Params) -> None:
    examples = {Path(f"data/sources/{t}.parquet") for t in params.generate.tenant_sources}
    assert outs("generate") == {Path(params.data.path)} | examples
    assert f"--out {params.data.path}" in DVC["generate"]["cmd"]
    assert "${data.path}" in DVC["prepare"]["deps"]


def test_stage_params_name_keys_of_params_yaml() -> None:
    """A stage lists a section (`train`) or one key of one (`monitor.prediction_column`)."""
    tree = yaml.safe_load((ROOT / "params.yaml").read_text())
    for stage in STAGES:
        for name in DVC[stage].get("params", []):
            node = tree
            for part in name.split("."):
                assert isinstance(node, dict), f"{stage}: {name}"
                assert part in node, f"{stage}: {name}"
                node = node[part]


def test_each_stage_reads_its_own_params_section_or_a_listed_exception() -> None:
    """`register` reading `promote:` is the one stage-to-flow exception (BORROWED_SECTIONS)."""
    borrowed = set()
    for stage in STAGES:
        for name in DVC[stage].get("params", []):
            section = name.split(".")[0]
            if section == stage or section in SHARED_SECTIONS:
                continue
            assert (stage, section) in BORROWED_SECTIONS, f"{stage} reads {name}"
            borrowed.add((stage, section))
    assert borrowed == BORROWED_SECTIONS, "an exception no stage needs any more: drop it"
    assert "register" not in PARAMS, "a register: section beside promote: is a second policy"


def test_every_params_section_belongs_to_a_stage_or_a_deployment() -> None:
    owners = set(STAGES) | set(DEPLOYMENTS) | SHARED_SECTIONS | {TENANTS_SECTION}
    assert set(PARAMS) <= owners, set(PARAMS) - owners


@pytest.mark.parametrize("name", list(DEPLOYMENTS))
def test_each_deployment_runs_the_flow_of_its_name_from_its_module(name: str) -> None:
    import importlib  # noqa: PLC0415  (the flows import Prefect: only here)

    path, function = DEPLOYMENTS[name]["entrypoint"].split(":")
    module = FLOW_MODULES.get(name, name)
    assert (path, function) == (f"flows/{module}.py", name)
    flow = getattr(importlib.import_module(f"flows.{module}"), function)
    assert flow.name == name


def test_no_deployment_is_named_after_a_single_stage() -> None:
    """`pipeline` runs every stage (what `make pipeline` runs); a deployment named `train`
    would read as the one stage of that name."""
    assert not set(DEPLOYMENTS) & set(STAGES)
    assert DEPLOYMENTS["pipeline"]["entrypoint"] == "flows/pipeline.py:pipeline"
    assert "pipeline:" in (ROOT / "Makefile").read_text()


def test_the_retrain_trigger_expects_the_event_the_monitor_emits() -> None:
    from flows.monitor import DRIFT_EVENT  # noqa: PLC0415  (imports Prefect: only here)

    retrain = DEPLOYMENTS["retrain"]
    assert retrain["triggers"][0]["expect"] == [DRIFT_EVENT]
    assert "event.payload.mlflow_run_id" in retrain["triggers"][0]["parameters"]["monitor_run_id"]
    assert "event.payload.tenant_id" in retrain["triggers"][0]["parameters"]["tenant"]


def test_per_tenant_deployments_share_a_queueing_concurrency_limit() -> None:
    for name in ("monitor", "retrain"):
        assert DEPLOYMENTS[name]["concurrency_limit"]["collision_strategy"] == "ENQUEUE"
        assert DEPLOYMENTS[name]["concurrency_limit"]["limit"] >= 1


# -- a tenant's chain: the same modules over its own files ------------------------------


@pytest.mark.parametrize("stage", TENANT_STAGES)
def test_each_tenant_stage_runs_its_module_for_the_tenant_over_params_tenants(stage: str) -> None:
    assert DVC[group(stage)]["foreach"] == "${tenants}"
    assert _spec(group(stage))["cmd"] == f"python -m models.{stage} --tenant {KEY}"
    assert Path(f"models/{stage}.py") in deps(group(stage))


@pytest.mark.parametrize("stage", TENANT_STAGES)
def test_tenant_stage_outputs_are_the_tenants_layout(stage: str) -> None:
    assert outs(group(stage)) == TENANT_OUTS[stage]


def test_a_tenant_stage_reads_only_its_own_earlier_outputs_or_sources() -> None:
    produced: set[Path] = set()
    for stage in TENANT_STAGES:
        for dep in deps(group(stage)):
            shared = TENANT_SOURCES | {paths.REGISTRY_TARGET}
            if dep.parts[0] in ("models", "common") or dep in shared:
                continue
            assert dep in produced, f"{group(stage)} depends on {dep}, not its own chain's"
        produced |= outs(group(stage))


def test_a_tenant_stage_reads_its_tenants_section_or_the_shared_ones_it_overrides() -> None:
    """The shared sections a stage reads, plus `tenants.<id>` (its overrides), or only its
    source (snapshot: the data contract's columns and the source)."""
    for shared, stage in zip(
        ["prepare", "validate", "train", "evaluate", "register"], TENANT_STAGES[1:], strict=True
    ):
        own = [p for p in _spec(group(stage)).get("params", []) if KEY not in p]
        assert own == DVC[shared].get("params", []), stage
        if DVC[shared].get("params"):
            assert f"tenants.{KEY}" in _spec(group(stage))["params"], stage
    assert f"tenants.{KEY}.source" in _spec(group("snapshot"))["params"]
    assert _spec(group("snapshot"))["always_changed"] is True
