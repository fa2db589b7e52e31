"""A throwaway copy of the project (git + DVC initialised) to run the real pipeline in.

Only the project's own files are copied, never what a user's runs leave in the checkout
(labelled production rows, dvc.lock, outputs, .mlops/), and commands run without the
user's settings variables: a test starts from the same state on every machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.settings import Settings
from tests.processes import run_group

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("dvc.yaml", "params.yaml", ".dvcignore", "models", "common")
EMPTY_DIRS = {"data/production": "README.md"}
"""Folders the retrain flow fills in a user's checkout: only their tracked README is copied."""
USER_VARIABLES = frozenset(
    {str(f.alias) for f in Settings.model_fields.values() if f.alias != "PG_BIN"}
    | {"MLOPS_PROJECT_DIR", "MLFLOW_REGISTRY_URI"}
)
"""A user's settings (common/settings.py; PG_BIN only finds binaries) and `make deploy`'s
project dir: each points at that user's state, so tests never inherit them."""
FAST = {
    "generate": {"rows": 4000, "tenant_sources": {"acme": 1000}},
    "train": {"n_estimators": 30},
    "prepare": {"reference_rows": 1000},
    "tenants": {},
}
"""Smaller data and models, and no tenant with a model of its own (params.yaml's example
tenant's chain would double each `dvc repro`): a test that wants tenants names its own."""


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra`'s keys over `base`'s, section by section; an empty section empties it."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out[key], value)
            if isinstance(value, dict) and value and isinstance(out.get(key), dict)
            else value
        )
    return out


@dataclass
class Workspace:
    """A project copy; `run` executes a command there with the embedded store under .mlops/."""

    path: Path
    env: dict[str, str] = field(default_factory=dict)

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("MLFLOW_", "AWS_")) and k not in USER_VARIABLES
        }
        venv_bin = str(Path(sys.executable).parent)
        env |= {
            "MLOPS_HOME": str(self.path / ".mlops"),
            "PATH": f"{venv_bin}:{env.get('PATH', '')}",
        }
        env |= {
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t",
        }
        env |= self.env
        proc = run_group(cmd, cwd=self.path, env=env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def python(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, *args, check=check)

    def params(self) -> dict[str, Any]:
        return dict(yaml.safe_load((self.path / "params.yaml").read_text()))

    def set_params(self, overrides: dict[str, Any]) -> None:
        (self.path / "params.yaml").write_text(
            yaml.safe_dump(_merge(self.params(), overrides), sort_keys=False)
        )


def make_workspace(
    path: Path,
    overrides: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    *,
    fast: bool = True,
    root: Path = ROOT,
) -> Workspace:
    """Copy the pipeline from `root` into `path`, shrink it (FAST unless fast=False), init
    git + DVC."""
    path.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src = root / name
        if src.is_dir():
            shutil.copytree(src, path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, path / name)
    for folder, readme in EMPTY_DIRS.items():
        (path / folder).mkdir(parents=True)
        shutil.copy2(root / folder / readme, path / folder / readme)
    ws = Workspace(path, env or {})
    ws.set_params(_merge(FAST if fast else {}, overrides or {}))
    ws.run("git", "init", "-q")
    ws.run(sys.executable, "-m", "dvc", "init", "-q")
    ws.run("git", "add", "-A")
    ws.run("git", "commit", "-qm", "workspace")
    return ws


def add_deployments(ws: Workspace) -> None:
    """The flows and prefect.yaml, its schedules inactive: no scheduled run (the hourly
    `monitor`, say) may start in the middle of a test; runs come only from the test."""
    shutil.copytree(ROOT / "flows", ws.path / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for deployment in project["deployments"]:
        for schedule in deployment.get("schedules") or []:
            schedule["active"] = False
    (ws.path / "prefect.yaml").write_text(yaml.safe_dump(project, sort_keys=False))
