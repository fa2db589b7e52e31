"""retrain: `train` then `promote`, the deployment the drift event triggers."""

from __future__ import annotations

from prefect import flow

from flows.promote import promote
from flows.train import train


@flow(name="retrain")
def retrain(project_dir: str = ".") -> bool:
    """Train a new version, then promote it under the policy; True if it became champion.

    The register stage already promotes a clear winner when no approval is required; then
    there is no challenger left for `promote` to judge.
    """
    if train(project_dir).promoted:
        return True
    return promote(project_dir)
