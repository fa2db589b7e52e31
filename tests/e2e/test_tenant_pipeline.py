"""Three tenants with models of their own, through `dvc repro`, on the embedded store.

acme's data is the example source `generate` writes (Parquet), globex's a CSV file and
initech's a Parquet file of another population, each its own customers. Every version
names its tenant and only its own snapshot's hash; no tenant's row reaches another's
training set; `dvc repro tenant-register@<id>` reruns that tenant's chain alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from common import dvc_pipeline, paths
from common.lineage import file_md5
from models.generate import Drift, generate, tenant_source
from tests.workspace import Workspace, make_workspace

NAME = "churn-classifier"
ROWS = 1200
SOURCES = {
    "acme": "data/sources/acme.parquet",  # written by `generate` (generate.tenant_sources)
    "globex": "incoming/globex.csv",
    "initech": "incoming/initech.parquet",
}
TENANTS = list(SOURCES)

VERSIONS = """
import json
from common.settings import get_settings
from common import registry
client = registry.connect(get_settings())
found = {}
for model in client.search_registered_models():
    versions = client.search_model_versions(f"name='{model.name}'")
    found[model.name] = {str(v.version): v.tags for v in versions}
print(json.dumps(found))
"""


def versions(ws: Workspace) -> dict[str, dict[str, dict[str, str]]]:
    """Every registered model's versions and their tags."""
    found: dict[str, dict[str, dict[str, str]]] = json.loads(
        ws.python("-c", VERSIONS).stdout.strip().splitlines()[-1]
    )
    return found


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    ws = make_workspace(
        tmp_path_factory.mktemp("tenants") / "ws",
        {"generate": {"tenant_sources": {"acme": ROWS}}},
    )
    (ws.path / "incoming").mkdir()
    tenant_source("globex", ROWS).to_csv(ws.path / SOURCES["globex"], index=False)
    initech = generate(ROWS, seed=77, drift=Drift(covariate={"region": 0.4}, churn_rate=0.3))
    initech["customer_id"] = "initech-" + initech["customer_id"]
    initech.to_parquet(ws.path / SOURCES["initech"], index=False)
    ws.set_params({"tenants": {t: {"source": {"path": p}} for t, p in SOURCES.items()}})
    ws.run("git", "add", "-A")
    ws.run("git", "commit", "-qm", "three tenants with their own data")
    return ws


@pytest.fixture(scope="module")
def first_run(ws: Workspace) -> str:
    return ws.run("dvc", "repro", timeout=1800).stdout  # three tenants and the shared model


@pytest.fixture(scope="module")
def registry(ws: Workspace, first_run: str) -> dict[str, dict[str, dict[str, str]]]:
    return versions(ws)


def test_each_tenant_gets_its_own_registered_model_beside_the_shared_one(
    registry: dict[str, Any],
) -> None:
    assert sorted(registry) == [NAME, *(f"{NAME}.{t}" for t in sorted(TENANTS))]
    for tenant in TENANTS:
        assert list(registry[f"{NAME}.{tenant}"]) == ["1"]


def test_each_version_names_its_tenant_and_only_its_own_snapshots_hash(
    ws: Workspace, registry: dict[str, Any]
) -> None:
    lock = yaml.safe_load((ws.path / "dvc.lock").read_text())["stages"]
    raw = {}
    for tenant in TENANTS:
        tags = registry[f"{NAME}.{tenant}"]["1"]
        where = paths.layout(tenant)
        (snapshot,) = lock[f"tenant-snapshot@{tenant}"]["outs"]
        assert tags["tenant"] == tenant
        assert tags["data.source"] == SOURCES[tenant]
        assert tags["dvc.raw_md5"] == snapshot["md5"] == file_md5(ws.path / where.SNAPSHOT)
        assert tags["dvc.train_md5"] == file_md5(ws.path / where.TRAIN)
        assert tags["dvc.holdout_md5"] == file_md5(ws.path / where.HOLDOUT)
        assert tags["onnx.parity"] == "passed"
        raw[tenant] = tags["dvc.raw_md5"]
    shared = registry[NAME]["1"]
    assert "tenant" not in shared
    assert len({*raw.values(), shared["dvc.raw_md5"]}) == len(TENANTS) + 1


def test_a_tenants_first_version_is_gated_against_the_shared_champion_on_its_holdout(
    ws: Workspace, registry: dict[str, Any]
) -> None:
    assert registry[NAME]["1"]["gate.reason"] == "no champion yet"
    for tenant in TENANTS:
        tags = registry[f"{NAME}.{tenant}"]["1"]
        assert tags["gate.reason"].startswith(
            f"vs the shared champion {NAME} v1 on the same holdout, "
        ), tags["gate.reason"]
        assert tags["gate.decided_by"] == f"tenant-register@{tenant} (dvc repro)"
        decision = json.loads((ws.path / paths.layout(tenant).REGISTER_REPORT).read_text())
        assert (decision["tenant"], decision["champion_model"]) == (tenant, NAME)
        assert decision["promoted"] == (tags["gate.decision"] == "promoted")
        summary = dvc_pipeline.summary(ws.path, tenant)
        assert (summary.model_name, summary.version) == (f"{NAME}.{tenant}", "1")


def test_the_summary_shows_each_tenants_own_model_after_the_shared_one(
    ws: Workspace, first_run: str
) -> None:
    out = ws.python("-m", "common.summary").stdout
    titles = [line.strip() for line in out.splitlines() if line.startswith("Pipeline result:")]
    assert titles == [f"Pipeline result: {NAME}"] + [
        f"Pipeline result: {NAME}.{t} (tenant {t}'s own model)" for t in TENANTS
    ]


def _ids(path: Path) -> set[int]:
    """A hash of each row's customer id."""
    ids = pd.read_parquet(path, columns=["customer_id"])["customer_id"]
    return set(pd.util.hash_pandas_object(ids, index=False).tolist())


def test_no_row_of_one_tenant_reaches_another_tenants_training_set(
    ws: Workspace, first_run: str
) -> None:
    trained = {t: _ids(ws.path / paths.layout(t).TRAIN) for t in TENANTS}
    held = {t: _ids(ws.path / paths.layout(t).HOLDOUT) for t in TENANTS}
    own = {t: _ids(ws.path / paths.layout(t).SNAPSHOT) for t in TENANTS}
    shared = _ids(ws.path / paths.TRAIN) | _ids(ws.path / paths.HOLDOUT)
    for tenant in TENANTS:
        assert trained[tenant] | held[tenant] == own[tenant]
        assert len(own[tenant]) == ROWS
        assert not trained[tenant] & shared
        for other in TENANTS:
            if other != tenant:
                assert not trained[tenant] & own[other], (tenant, other)
    found = sorted(p.parent.name for p in (ws.path / "data/tenants").glob("*/prepared"))
    assert found == sorted(TENANTS)


def test_a_repro_with_nothing_changed_reads_the_sources_and_retrains_nothing(
    ws: Workspace, first_run: str
) -> None:
    out = ws.run("dvc", "repro").stdout

    ran = sorted(line.split("'")[1] for line in out.splitlines() if "Running stage" in line)
    assert ran == sorted(["registry-target", *(f"tenant-snapshot@{t}" for t in TENANTS)])
    assert sum(1 for v in versions(ws).values() for _ in v) == len(TENANTS) + 1


def test_one_tenants_chain_reruns_alone_and_is_gated_against_what_serves_it(
    ws: Workspace, registry: dict[str, Any]
) -> None:
    ws.set_params({"tenants": {"globex": {"train": {"n_estimators": 2, "max_depth": 1}}}})

    out = ws.run("dvc", "repro", "tenant-register@globex").stdout

    ran = [line.split("'")[1] for line in out.splitlines() if "Running stage" in line]
    assert "tenant-train@globex" in ran
    # registry-target (the registry the chain writes to) runs on every repro; nothing else
    assert all(stage.endswith("@globex") for stage in ran if stage != "registry-target"), ran
    now = versions(ws)
    assert sorted(now[f"{NAME}.globex"]) == ["1", "2"]
    for name in (NAME, f"{NAME}.acme", f"{NAME}.initech"):
        assert now[name] == registry[name]
    first, second = now[f"{NAME}.globex"]["1"], now[f"{NAME}.globex"]["2"]
    assert json.loads(second["params.train"])["n_estimators"] == 2
    assert second["gate.decision"] == "rejected"
    rival = "champion v1" if first["gate.decision"] == "promoted" else f"shared champion {NAME} v1"
    assert (
        f"vs {'the ' if 'shared' in rival else ''}{rival} on the same holdout"
        in (second["gate.reason"])
    )
