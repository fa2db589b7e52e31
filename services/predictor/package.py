"""Copy the champion from the MLflow registry into BentoML's model store, then (optionally) build.

`bentoml build` puts that copy inside the Bento, so an image of it starts without a
registry; when the registry answers, the service still follows the alias from there.
`--export DIR` then unpacks the Bento, model included, into DIR: the build context of
infra/docker/Dockerfile.predictor (the store's copy of a Bento leaves the model out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import bentoml
import mlflow
import yaml

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


def export(tag: str, dest: Path) -> None:
    """Unpack Bento `tag`, with its models, into `dest` (replaced)."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = bentoml.export_bento(tag, str(Path(tmp).resolve() / "bento.bento"))
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help="then run `bentoml build`")
    parser.add_argument("--export", type=Path, help="then unpack the built Bento into this dir")
    args = parser.parse_args()
    settings = get_settings()
    tag = bundle(settings)
    print(f"bundled models:/{settings.model_name}@{settings.model_alias} as {tag}")
    if args.build:
        proc = subprocess.run(
            [sys.executable, "-m", "bentoml", "build", "-f", BENTOFILE, "."], check=False
        )
        if proc.returncode != 0:  # bentoml build says why; it needs `uv` on PATH
            raise UserError(f"bentoml build -f {BENTOFILE} failed (its message is above)")
    if args.export:
        with open(BENTOFILE) as fh:
            name = yaml.safe_load(fh)["name"]
        built = str(bentoml.get(f"{name}:latest").tag)
        export(built, args.export)
        print(f"exported {built} (model included) to {args.export}/")


if __name__ == "__main__":
    run_cli(main)
