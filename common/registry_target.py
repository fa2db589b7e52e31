"""registry-target: which registry this pipeline writes to, as a file the stages that write
there depend on.

DVC knows files, not environment variables: without this, pointing MLFLOW_TRACKING_URI at
another MLflow (or MLOPS_ENV at another environment) left every stage "unchanged", and
the new registry got nothing. dvc.yaml's `registry-target` stage runs on every `dvc repro`
(always_changed) and writes reports/registry_target.json; `train` and `register` (and the
tenants' chains) depend on that file, so they run again exactly when the registry they
write to changes, and stay skipped while it does not. The file keeps its content (hence
its hash) when the target is the same, so nothing downstream runs for nothing.

The target is the tracking store (without credentials), the environment and its registered
model: what a version's `models:/<name>/<version>` means.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from common import paths
from common.errors import run_cli
from common.settings import Settings, get_settings


@dataclass(frozen=True)
class Target:
    """The registry a pipeline run writes its runs and versions to."""

    tracking_uri: str
    environment: str
    model_name: str

    def describe(self) -> str:
        return f"{self.model_name} ({self.environment}) in {self.tracking_uri}"


def without_credentials(uri: str) -> str:
    """The URI minus any `user:password@`: the file is tracked, the store is what counts."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def current(settings: Settings) -> Target:
    """The registry these settings write to."""
    return Target(
        without_credentials(settings.tracking_uri), settings.mlops_env, settings.model_name
    )


def recorded(root: Path = Path()) -> Target | None:
    """The target the last `registry-target` stage wrote under `root`, if any."""
    try:
        return Target(**json.loads((root / paths.REGISTRY_TARGET).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write(target: Target, root: Path = Path()) -> bool:
    """Record `target`; rewrite the file only when it changed. True when it did."""
    path = root / paths.REGISTRY_TARGET
    if recorded(root) == target:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(target), indent=2) + "\n")
    return True


def main() -> None:
    before = recorded()
    target = current(get_settings())
    if not write(target):
        print(f"registry-target: {target.describe()} (unchanged)")
        return
    was = f" (was {before.describe()}): train and register run again" if before else ""
    print(f"registry-target: {target.describe()}{was}")


if __name__ == "__main__":
    run_cli(main)
