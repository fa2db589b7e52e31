"""Copy the champion from the MLflow registry into BentoML's model store, then (optionally) build.

`bentoml build` puts that copy inside the Bento, so an image of it starts without a
registry; when the registry answers, the service still follows the alias from there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys

import bentoml
import mlflow

from common import registry
from common.errors import UserError, run_cli
from common.settings import Settings, get_settings
from services.predictor.runtime import TAGS_FILE
from services.predictor.service import BUNDLE

BENTOFILE = "services/predictor/bentofile.yaml"


def bundle(settings: Settings) -> str:
    """Store `models:/<name>@<alias>` as the bundled model; return its BentoML tag."""
    client = registry.connect(settings)
    mv = registry.version_by_alias(client, settings.model_name, settings.model_alias)
    if mv is None:
        raise UserError(
            f"models:/{settings.model_name}@{settings.model_alias} does not exist in "
            f"{settings.tracking_uri}: run `make demo` (or `dvc repro`) first."
        )
    labels = {"model_name": settings.model_name, "model_version": str(mv.version)}
    with contextlib.suppress(bentoml.exceptions.NotFound):
        latest = bentoml.models.get(f"{BUNDLE}:latest")
        if latest.info.labels == labels:
            return str(latest.tag)  # this version is bundled already
    with bentoml.models.create(BUNDLE, labels=labels) as model:
        mlflow.artifacts.download_artifacts(
            f"models:/{settings.model_name}/{mv.version}", dst_path=model.path
        )
        tags = {**mv.tags, "version": str(mv.version)}
        with open(model.path_of(TAGS_FILE), "w") as fh:
            json.dump(tags, fh, indent=2)
    return str(model.tag)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help="then run `bentoml build`")
    args = parser.parse_args()
    settings = get_settings()
    tag = bundle(settings)
    print(f"bundled models:/{settings.model_name}@{settings.model_alias} as {tag}")
    if args.build:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "bentoml",
                "build",
                "-f",
                "services/predictor/bentofile.yaml",
                ".",
            ],
            check=True,
        )


if __name__ == "__main__":
    run_cli(main)
