"""Run the DVC pipeline one stage at a time through DVC's CLI; dvc.yaml stays the definition.

Used by the `pipeline` flow (and `retrain`'s `dvc add`): each stage is its own step, its
output is streamed line by line, and a stage that fails with a user-facing error (the
`error: ...` paragraph of common.errors.run_cli) is told apart from a crash that may be
worth retrying.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from common import paths, registry, registry_target
from common.errors import UserError
from common.params import PARAMS_FILE, load_params
from common.registry import tags as tag
from common.settings import Settings

DVC = (sys.executable, "-m", "dvc")


class StageCrashError(RuntimeError):
    """A command failed for a reason that may pass on a retry (crash, network, lock)."""


class StageRejectedError(UserError):
    """A stage refused its input (validation, parity, bad params): retrying cannot help."""


TENANT_STAGE_PREFIX = "tenant-"
"""dvc.yaml's per-tenant foreach groups are `tenant-<stage>`; DVC names each `<group>@<id>`."""
TARGET_STAGE = "registry-target"
"""The stage recording which registry the run writes to (common.registry_target); every
chain, a tenant's too, runs it first so its train/register see a change of registry."""


def stages(root: Path, tenant: str | None = None) -> list[str]:
    """The stages of root/dvc.yaml to run, in the file's order: the shared model's (None),
    or `tenant`'s own chain (its `tenant-<stage>@<tenant>` of every foreach group).

    A tenant params.yaml does not list is a UserError naming the ones it does.
    """
    spec: Any = yaml.safe_load((root / "dvc.yaml").read_text())
    entries: dict[str, Any] = spec.get("stages", {})
    if tenant is None:
        return [name for name, body in entries.items() if "foreach" not in body]
    load_params(root / PARAMS_FILE).for_tenant(tenant)
    first = [TARGET_STAGE] if TARGET_STAGE in entries else []
    return first + [f"{name}@{tenant}" for name, body in entries.items() if "foreach" in body]


def _error_paragraph(lines: list[str]) -> str | None:
    """The `error: ...` paragraph a stage printed through run_cli, if any."""
    for i, line in enumerate(lines):
        if line.startswith("error: "):
            para = [line.removeprefix("error: ")]
            for rest in lines[i + 1 :]:
                if not rest.strip() or rest.startswith(("ERROR:", "error: ")):
                    break
                para.append(rest)
            return " ".join(p.strip() for p in para)
    return None


def run(
    args: tuple[str, ...],
    root: Path,
    on_line: Callable[[str], None],
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """Run a command in `root`, handing each output line to `on_line`; raise on failure.

    Returns its output lines."""
    with subprocess.Popen(
        args,
        cwd=root,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    ) as proc:
        assert proc.stdout is not None
        lines: list[str] = []
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            lines.append(line)
            on_line(line)
        code = proc.wait()
    if code == 0:
        return lines
    message = _error_paragraph(lines)
    if message is not None:
        raise StageRejectedError(message)
    tail = "\n".join(lines[-20:])
    shown = " ".join(args[2:] if args[:3] == DVC else args)
    raise StageCrashError(f"{shown} exited {code}\n{tail}")


def run_stage(
    stage: str, root: Path, on_line: Callable[[str], None], flow_run_id: str | None = None
) -> bool:
    """`dvc repro --single-item <stage>`: run one stage if its inputs changed; True if it ran.

    The orchestrator's run id goes to the stage as PREFECT__FLOW_RUN_ID (the settings
    name), so the model version it registers is tagged with it whoever started the run.
    """
    env = {**os.environ, "PREFECT__FLOW_RUN_ID": flow_run_id} if flow_run_id else None
    lines = run((*DVC, "repro", "--single-item", stage), root, on_line, env)
    return any(line.startswith(f"Running stage '{stage}'") for line in lines)


def register_stage(tenant: str | None = None) -> str:
    """The stage that registers the shared model's version (None) or `tenant`'s."""
    return "register" if tenant is None else f"{TENANT_STAGE_PREFIX}register@{tenant}"


def has_remote(root: Path) -> bool:
    """Whether the project has a DVC remote configured (then the flow pulls and pushes)."""
    proc = subprocess.run(
        (*DVC, "remote", "list"), cwd=root, capture_output=True, text=True, check=False
    )
    return proc.returncode == 0 and bool(proc.stdout.strip())


@dataclass(frozen=True)
class RunSummary:
    """What a pipeline run produced, read from the files the stages hand to each other."""

    model_name: str
    version: str
    promoted: bool
    reason: str
    metrics: dict[str, float]
    mlflow_run_id: str | None
    tenant: str | None = None
    registered_now: bool = True
    """Whether this run's register stage made the version; False: nothing changed, and the
    version is the one an earlier run registered (in `registry`)."""
    registry: str | None = None
    """Where the version was registered (registry_target.Target.describe), when recorded."""
    canary: bool = False
    """Passed the gate with `rollout.canary` on: `challenger` until the rollout flow decides."""


def summary(root: Path, tenant: str | None = None, registered_now: bool = True) -> RunSummary:
    """The register decision, holdout metrics and MLflow run of the last pipeline run of the
    shared model (None) or of `tenant`'s own model; `registered_now`: whether the register
    stage ran in this run (else the decision is an earlier run's)."""
    where = paths.layout(tenant)
    target = registry_target.recorded(root)
    decision = json.loads((root / where.REGISTER_REPORT).read_text())
    metrics = json.loads((root / where.METRICS).read_text())
    train_file = root / where.TRAIN_RUN
    run_id = json.loads(train_file.read_text()).get("run_id") if train_file.exists() else None
    return RunSummary(
        model_name=decision["model_name"],
        version=str(decision["version"]),
        promoted=bool(decision["promoted"]),
        reason=decision["reason"],
        metrics={k: float(v) for k, v in metrics.items() if k != "rows"},
        mlflow_run_id=run_id,
        tenant=tenant,
        registered_now=registered_now,
        registry=target.describe() if target else None,
        canary=bool(decision.get("canary", False)),
    )


def check_registered(s: RunSummary, client: MlflowClient, where: str) -> None:
    """Fail unless the registry `client` talks to (described by `where`) holds the version
    `s` names, made by its MLflow run: a report from another registry's run is never told
    as this one's."""
    try:
        mv = client.get_model_version(s.model_name, s.version)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        mv = None
    made_by = mv.tags.get(tag.MLFLOW_RUN_ID) if mv is not None else None
    if mv is None or (s.mlflow_run_id and made_by and made_by != s.mlflow_run_id):
        earlier = f" registered in {s.registry}" if s.registry else ""
        raise UserError(
            f"the last register stage's {s.model_name} v{s.version}{earlier} is not in {where}; "
            "run the pipeline (`dvc repro`) against this registry to train and register there."
        )


def check_in_registry(s: RunSummary, settings: Settings) -> None:
    """check_registered against the registry `settings` point at."""
    where = registry_target.current(settings).describe()
    check_registered(s, registry.connect(settings), where)


def mlflow_run_link(tracking_uri: str, run_id: str | None) -> str:
    """A link to the run in the MLflow UI, or how to open the embedded store."""
    if run_id is None:
        return "(no MLflow run recorded)"
    if tracking_uri.startswith(("http://", "https://")):
        url = f"{tracking_uri.rstrip('/')}/#/runs/{run_id}"
        return f"[{run_id}]({url})"
    return f"run `{run_id}` in `{tracking_uri}` (open it with `make mlflow-ui`)"


def _done(s: RunSummary, *, bold: bool = False) -> str:
    """What this run's register stage made of the version."""
    b = "**" if bold else ""
    if s.promoted:
        return f"promoted to {b}champion{b}"
    if s.canary:
        return f"{b}challenger{b} for a canary (the rollout flow ramps it on live traffic)"
    return f"kept as {b}challenger{b}"


def verdict(s: RunSummary) -> str:
    """What the run did with the version, in one line: never "promoted" for an earlier run's."""
    if s.registered_now:
        return _done(s) + f": {s.reason}"
    where = f" in {s.registry}" if s.registry else ""
    then = "promoted" if s.promoted else "a canary" if s.canary else "kept as challenger"
    return f"unchanged: nothing to retrain; registered by an earlier run{where} ({then} then)"


def summary_markdown(s: RunSummary, tracking_uri: str) -> str:
    """The run summary as a Prefect markdown artifact."""
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(s.metrics.items()))
    whose = f" (tenant {s.tenant}'s own model)" if s.tenant else ""
    if s.registered_now:
        line = f"{_done(s, bold=True)}: {s.reason}"
    else:
        line = f"**unchanged**: {verdict(s).removeprefix('unchanged: ')}"
    return (
        f"# train: {s.model_name} v{s.version}{whose}\n\n"
        f"{line}\n\n"
        f"| holdout metric | value |\n|---|---|\n{rows}\n\n"
        f"MLflow: {mlflow_run_link(tracking_uri, s.mlflow_run_id)}\n"
    )
