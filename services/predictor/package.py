"""Copy the champion from the MLflow registry into BentoML's model store, then (optionally) build.

`bentoml build` puts that copy inside the Bento, so an image of it starts without a
registry; when the registry answers, the service still follows the alias from there.
`--export DIR` then unpacks the Bento, model included, into DIR: the build context of
infra/docker/Dockerfile.predictor (the store's copy of a Bento leaves the model out).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import bentoml
import yaml

from common.errors import UserError, run_cli
from common.registry import served
from common.registry import tags as tag
from common.settings import Settings, get_settings
from services.predictor.service import BUNDLE

BENTOFILE = "services/predictor/bentofile.yaml"


def bundle(settings: Settings) -> str:
    """Store `models:/<name>@<alias>` as the bundled model; return its BentoML tag.

    `served.resolve` checks the version's files against its manifest first; the bundle
    carries the manifest and the version's tags (its manifest SHA-256), which the predictor
    checks again before it serves the bundled copy (`served.from_dir`).

    The version is downloaded into the predictor's own cache, so a predictor started next
    with the same MLOPS_HOME finds it there.
    """
    version = served.resolve(
        settings, settings.model_name, settings.model_alias, served.cache_dir(settings)
    )
    # the sealed manifest's hash too: a bundle made before versions were sealed is not reused
    labels = {
        "model_name": version.name,
        "model_version": version.version,
        "manifest_sha256": version.tags.get(tag.MANIFEST_SHA256, ""),
    }
    with contextlib.suppress(bentoml.exceptions.NotFound):
        latest = bentoml.models.get(f"{BUNDLE}:latest")
        if latest.info.labels == labels:
            return str(latest.tag)  # this version is bundled already
    with bentoml.models.create(BUNDLE, labels=labels) as model:
        version.bundle(Path(model.path))
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
