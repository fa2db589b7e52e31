"""dvc.yaml, common/paths.py and models/ describe the same pipeline with the same words."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from common import paths
from common.params import Params
from tests.workspace import ROOT

STAGES = ["generate", "prepare", "validate", "train", "evaluate", "register"]
OUTS = {
    "prepare": {paths.TRAIN, paths.HOLDOUT, paths.REFERENCE},
    "validate": {paths.VALIDATION_REPORT},
    "train": {paths.TRAIN_RUN},
    "evaluate": {paths.METRICS, paths.CONFUSION, paths.ROC},
    "register": {paths.REGISTER_REPORT},
}
"""What each stage writes, in paths.py's names; dvc.yaml must declare exactly these."""

DVC: dict[str, Any] = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _names(entries: list[Any]) -> set[Path]:
    """Paths of a deps/outs/metrics/plots list, whose items are strings or {path: options}."""
    found = set()
    for entry in entries:
        found |= {Path(entry)} if isinstance(entry, str) else {Path(k) for k in entry}
    return found


def outs(stage: str) -> set[Path]:
    spec = DVC[stage]
    return _names(spec.get("outs", []) + spec.get("metrics", []) + spec.get("plots", []))


def deps(stage: str) -> set[Path]:
    return _names(DVC[stage].get("deps", []))


def test_stages_are_the_loop_in_order() -> None:
    assert list(DVC) == STAGES


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
    assert files <= set().union(*(outs(s) for s in STAGES))
    assert {p.parent for p in OUTS["prepare"]} == {paths.PREPARED}


def test_stages_depend_only_on_earlier_outputs_or_sources() -> None:
    produced: set[Path] = set()
    for stage in STAGES:
        for dep in deps(stage):
            if "${" in str(dep) or dep.parts[0] in ("models", "common"):
                continue
            assert dep in produced, f"{stage} depends on {dep}, which no earlier stage writes"
        produced |= outs(stage)


def test_generate_writes_the_default_data_path(params: Params) -> None:
    assert outs("generate") == {Path(params.data.path)}
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


def test_the_retrain_trigger_expects_the_event_the_monitor_emits() -> None:
    from flows.monitor import DRIFT_EVENT  # noqa: PLC0415  (imports Prefect: only here)

    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    retrain = next(d for d in deployments if d["name"] == "retrain")
    assert retrain["triggers"][0]["expect"] == [DRIFT_EVENT]
    assert "event.payload.mlflow_run_id" in retrain["triggers"][0]["parameters"]["monitor_run_id"]
