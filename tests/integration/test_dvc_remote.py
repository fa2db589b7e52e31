"""DVC data round trip through an S3 remote: push, lose the cache and outputs, pull back."""

from __future__ import annotations

import os
import shutil

import pytest

from common import dvc_pipeline
from common.lineage import file_md5
from flows.pipeline import PULL
from tests.servers import DVC_BUCKET, S3Endpoint
from tests.workspace import make_workspace

OUTPUTS = (
    "data/raw/customers.parquet",
    "data/prepared/train.parquet",
    "data/prepared/holdout.parquet",
    "data/prepared/reference.parquet",
)


def test_push_then_pull_restores_outputs(
    tmp_path_factory: pytest.TempPathFactory, s3: S3Endpoint
) -> None:
    ws = make_workspace(tmp_path_factory.mktemp("dvc-remote"), env=dict(s3.creds))
    ws.run("dvc", "repro", "generate", "prepare")
    before = {name: file_md5(ws.path / name) for name in OUTPUTS}

    ws.run("dvc", "remote", "add", "-d", "store", f"s3://{DVC_BUCKET}/cache")
    ws.run("dvc", "remote", "modify", "store", "endpointurl", s3.url)
    ws.run("dvc", "push")
    keys = set(s3.keys(DVC_BUCKET, "cache/"))
    for name, md5 in before.items():
        assert f"cache/files/md5/{md5[:2]}/{md5[2:]}" in keys, name

    shutil.rmtree(ws.path / ".dvc/cache")
    for name in OUTPUTS:
        (ws.path / name).unlink()
    ws.run("dvc", "pull")
    after = {name: file_md5(ws.path / name) for name in OUTPUTS}
    assert after == before


def test_the_train_flows_pull_passes_on_a_project_not_yet_run(
    tmp_path_factory: pytest.TempPathFactory, s3: S3Endpoint
) -> None:
    """A fresh project with a remote: no dvc.lock, nothing pushed; the pull must not fail."""
    ws = make_workspace(tmp_path_factory.mktemp("dvc-first"), env=dict(s3.creds))
    ws.run("dvc", "remote", "add", "-d", "store", f"s3://{DVC_BUCKET}/first")
    ws.run("dvc", "remote", "modify", "store", "endpointurl", s3.url)
    assert ws.run("dvc", *PULL.split()[:1], check=False).returncode != 0  # plain pull fails
    lines: list[str] = []
    dvc_pipeline.run(
        (*dvc_pipeline.DVC, *PULL.split()), ws.path, lines.append, env={**os.environ, **s3.creds}
    )
