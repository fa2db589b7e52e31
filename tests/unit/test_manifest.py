"""Sealed model directories: every file's SHA-256 in manifest.json, the manifest's own in a tag;
and only the project's formats load (skops with the types trusted in code, never pickle)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import mlflow.sklearn
import pytest
import skops.io  # type: ignore[import-untyped]
import yaml
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.pipeline import Pipeline

from common.params import DataParams, Params
from models import manifest
from models.manifest import MANIFEST_FILE, UntrustedModelError
from models.predict import SKOPS_TRUSTED, ModelError, Scorer, load_pipeline
from tests.unit.test_predict import fitted, save_model_dir, training_rows

WHAT = "models:/m/3"


@pytest.fixture(scope="module")
def pipeline(params: Params, data_params: DataParams) -> Pipeline:
    return fitted(training_rows().head(600), data_params, params)


def save(pipeline: Pipeline, path: Path, fmt: str) -> None:
    mlflow.sklearn.save_model(
        pipeline, str(path), serialization_format=fmt, skops_trusted_types=SKOPS_TRUSTED
    )


@pytest.fixture
def sealed_dir(tmp_path: Path) -> tuple[Path, str]:
    root = tmp_path / "model"
    (root / "extra_files").mkdir(parents=True)
    (root / "MLmodel").write_text("flavors: {}\n")
    (root / "extra_files" / "model.onnx").write_bytes(b"\x08\x07onnx")
    (root / "registered_model_meta").write_text("model_name: m\n")  # MLflow's, on download
    return root, manifest.write(root)


def test_a_manifest_lists_every_file_with_its_sha256_and_size(
    sealed_dir: tuple[Path, str],
) -> None:
    root, digest = sealed_dir
    entries = manifest.build(root)
    assert set(entries) == {"MLmodel", "extra_files/model.onnx"}
    onnx = entries["extra_files/model.onnx"]
    assert onnx.sha256 == hashlib.sha256(b"\x08\x07onnx").hexdigest()
    assert onnx.size == 6
    assert digest == hashlib.sha256((root / MANIFEST_FILE).read_bytes()).hexdigest()
    assert manifest.write(root) == digest  # the same files: the same bytes


def test_verifies_the_files_it_was_sealed_with(sealed_dir: tuple[Path, str]) -> None:
    root, digest = sealed_dir
    manifest.verify(root, digest, WHAT)


def test_refuses_a_tampered_file_naming_the_version_and_the_file(
    sealed_dir: tuple[Path, str],
) -> None:
    root, digest = sealed_dir
    (root / "extra_files" / "model.onnx").write_bytes(b"\x08\x07evil")  # same size
    with pytest.raises(UntrustedModelError) as caught:
        manifest.verify(root, digest, WHAT)
    assert str(caught.value) == (
        f"{WHAT}: file extra_files/model.onnx differs from the one registered (sha256 mismatch)"
    )


def test_refuses_an_extra_file(sealed_dir: tuple[Path, str]) -> None:
    root, digest = sealed_dir
    (root / "extra_files" / "sitecustomize.py").write_text("import os\n")
    with pytest.raises(UntrustedModelError, match=r"file extra_files/sitecustomize\.py is not in"):
        manifest.verify(root, digest, WHAT)


def test_refuses_a_missing_file(sealed_dir: tuple[Path, str]) -> None:
    root, digest = sealed_dir
    (root / "MLmodel").unlink()
    with pytest.raises(UntrustedModelError, match=f"{WHAT}: file MLmodel of its manifest.json"):
        manifest.verify(root, digest, WHAT)


def test_refuses_a_manifest_rewritten_with_the_files(sealed_dir: tuple[Path, str]) -> None:
    root, digest = sealed_dir
    (root / "extra_files" / "model.onnx").write_bytes(b"other")
    manifest.write(root)  # consistent with the files, but not the one registered
    with pytest.raises(UntrustedModelError, match=r"manifest\.json was changed after registration"):
        manifest.verify(root, digest, WHAT)


def test_refuses_a_version_without_a_manifest_and_says_how_to_reregister(tmp_path: Path) -> None:
    (tmp_path / "MLmodel").write_text("flavors: {}\n")
    with pytest.raises(UntrustedModelError) as caught:
        manifest.verify(tmp_path, "0" * 64, WHAT)
    assert f"{WHAT} carries no manifest.json" in str(caught.value)
    assert "make demo" in str(caught.value)
    assert "dvc repro" in str(caught.value)


def test_refuses_a_version_without_the_manifest_tag(sealed_dir: tuple[Path, str]) -> None:
    root, _ = sealed_dir
    with pytest.raises(UntrustedModelError, match=r"has no model\.manifest_sha256 tag"):
        manifest.verify(root, None, WHAT)


def test_refuses_an_unreadable_manifest(sealed_dir: tuple[Path, str]) -> None:
    root, _ = sealed_dir
    (root / MANIFEST_FILE).write_text("[]")
    digest = manifest.file_sha256(root / MANIFEST_FILE)
    with pytest.raises(UntrustedModelError, match=r"manifest\.json is not a manifest"):
        manifest.verify(root, digest, WHAT)


def test_loads_the_pipeline_from_its_skops_file(pipeline: Pipeline, tmp_path: Path) -> None:
    save(pipeline, tmp_path / "m", "skops")
    loaded = load_pipeline(tmp_path / "m")
    assert list(loaded.classes_) == list(pipeline.classes_)


@pytest.mark.parametrize("fmt", ["cloudpickle", "pickle"])
def test_refuses_a_model_whose_mlmodel_asks_for_pickle(
    pipeline: Pipeline, tmp_path: Path, fmt: str
) -> None:
    path = tmp_path / "m"
    save(pipeline, path, fmt)
    with pytest.raises(UntrustedModelError, match=f"asks to load the pipeline with '{fmt}'"):
        load_pipeline(path)


def test_the_scorer_refuses_a_sealed_version_that_asks_for_cloudpickle(
    tmp_path: Path, data_params: DataParams, params: Params
) -> None:
    rows = training_rows().head(600)
    path = save_model_dir(fitted(rows, data_params, params), data_params, rows, tmp_path / "m")
    mlmodel = yaml.safe_load((path / "MLmodel").read_text())
    mlmodel["flavors"]["sklearn"]["serialization_format"] = "cloudpickle"
    (path / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    manifest.write(path)  # sealed that way: the files match, the format does not
    manifest.verify(path, manifest.file_sha256(path / MANIFEST_FILE), WHAT)
    with pytest.raises(UntrustedModelError, match="only 'skops' is loaded here"):
        Scorer.load(path, prefer_onnx=True)


def test_refuses_a_skops_file_holding_types_not_trusted_in_code(
    tmp_path: Path, data_params: DataParams
) -> None:
    rows = training_rows().head(400)
    model = HistGradientBoostingClassifier(max_iter=5).fit(
        rows[data_params.numeric].fillna(0), rows[data_params.target]
    )
    path = tmp_path / "m"
    # the MLmodel's own list trusts everything the file holds: it is not what decides
    mlflow.sklearn.save_model(
        model,
        str(path),
        serialization_format="skops",
        skops_trusted_types=skops.io.get_untrusted_types(data=skops.io.dumps(model)),
    )
    with pytest.raises(UntrustedModelError, match="does not load with the project's trusted"):
        load_pipeline(path)


def test_refuses_a_pickled_model_path_outside_the_directory(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    path = tmp_path / "m"
    save(pipeline, path, "skops")
    shutil.copy(path / "model.skops", tmp_path / "outside.skops")
    mlmodel = yaml.safe_load((path / "MLmodel").read_text())
    mlmodel["flavors"]["sklearn"]["pickled_model"] = "../outside.skops"
    (path / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    with pytest.raises(ModelError, match="is not a file in it"):
        load_pipeline(path)
