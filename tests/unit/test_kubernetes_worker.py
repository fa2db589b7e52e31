"""infra/kubernetes/worker/: the workers' Deployment and its KEDA scaling, checked offline.

The Deployment against the Kubernetes API's JSON schema (`kubernetes-validate`); the
ScaledObject and TriggerAuthentication against KEDA's own CRD schemas, vendored from the
kedacore/keda repository into infra/kubernetes/keda/, made strict as an API server with
strict field validation is (an unknown field fails). That the trigger's query runs and
counts the right messages: tests/integration/test_worker_remote.py.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from tests.workspace import ROOT

pytestmark = pytest.mark.unit

KUBE = ROOT / "infra/kubernetes"
KEDA = KUBE / "keda"
KUBERNETES = ["1.30.0", "1.33.0", kubernetes_validate.latest_version()]
KEDA_VERSION = "v2.20.2"


def manifests() -> dict[str, dict[str, Any]]:
    """The manifests of infra/kubernetes/worker/ (`kubectl apply -f` it) by kind."""
    docs = [yaml.safe_load(p.read_text()) for p in sorted((KUBE / "worker").glob("*.yaml"))]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs) == 3, "one file per kind"
    return by_kind


def _strict(schema: Any) -> Any:
    """The CRD schema as the API server applies it with strict field validation: an object
    with listed properties takes no others (unless the schema preserves unknown fields)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def crd_validator(name: str, version: str = "v1alpha1") -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((KEDA / name).read_text())
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = _strict(served["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


CRDS = {
    "ScaledObject": "keda.sh_scaledobjects.yaml",
    "TriggerAuthentication": "keda.sh_triggerauthentications.yaml",
}


def _errors(kind: str, doc: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in crd_validator(CRDS[kind]).iter_errors(doc)
    ]


@pytest.mark.parametrize("version", KUBERNETES)
def test_the_worker_deployment_is_a_valid_kubernetes_deployment(version: str) -> None:
    kubernetes_validate.validate(manifests()["Deployment"], version, strict=True)


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_the_keda_objects_match_kedas_own_crd_schemas(kind: str) -> None:
    doc = manifests()[kind]
    assert doc["apiVersion"] == "keda.sh/v1alpha1"
    assert _errors(kind, doc) == []


def test_a_wrong_keda_field_is_caught_offline() -> None:
    """The check has teeth: a misspelt field and a count that is a string are refused."""
    scaled = copy.deepcopy(manifests()["ScaledObject"])
    scaled["spec"]["minReplicas"] = 0
    scaled["spec"]["maxReplicaCount"] = "10"
    errors = _errors("ScaledObject", scaled)
    assert any("minReplicas" in e for e in errors), errors
    assert any(e.startswith("spec/maxReplicaCount") for e in errors), errors
    auth = copy.deepcopy(manifests()["TriggerAuthentication"])
    del auth["spec"]["secretTargetRef"][0]["key"]
    assert _errors("TriggerAuthentication", auth)


def test_keda_scales_the_worker_deployment_from_zero_on_the_request_queues() -> None:
    docs = manifests()
    deployment, scaled = docs["Deployment"], docs["ScaledObject"]
    auth = docs["TriggerAuthentication"]
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert spec.get("scaleTargetRef", {}).get("kind", "Deployment") == "Deployment"
    assert spec["minReplicaCount"] == 0
    assert spec["maxReplicaCount"] >= 2
    assert "replicas" not in deployment["spec"]  # KEDA's, or every `apply` resets it
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "postgresql"
    meta = trigger["metadata"]
    # KEDA's postgresql scaler (pkg/scalers/postgresql_scaler.go): `query` is required,
    # `targetQueryValue` must parse as a non-zero float, the connection comes from the auth.
    assert float(meta["targetQueryValue"]) > 0
    assert float(meta["activationTargetQueryValue"]) == 0
    assert "pgmq.metrics" in meta["query"]
    assert r"'q\_jobs\_req\_%'" in meta["query"]
    assert not {"host", "userName", "password", "connectionFromEnv"} & set(meta)
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    (ref,) = auth["spec"]["secretTargetRef"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert ref == {
        "parameter": "connection",
        "name": container["envFrom"][0]["secretRef"]["name"],
        "key": "DATABASE_URL",
    }


def test_the_worker_runs_unprivileged_with_bounded_resources_and_its_metrics_probed() -> None:
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    argv = container["command"]
    assert argv[:3] == ["python", "-m", "services.worker"]
    assert "--idle-exit" not in argv  # a Deployment would restart it: KEDA scales to zero
    (port,) = container["ports"]
    assert argv[argv.index("--metrics-port") + 1] == str(port["containerPort"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/metrics", "port": port["name"]}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["privileged"] is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(container["resources"]) == {"requests", "limits"}
    assert container["envFrom"] == [{"secretRef": {"name": "mlops-worker-env"}}]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert not [name for name in env if "PASSWORD" in name or "URL" in name]
    # the database and the registry are all it reaches: models through MLflow's proxy
    assert env["MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"] == "false"


@pytest.mark.parametrize("name", sorted(CRDS.values()))
def test_the_vendored_crds_name_their_source_version_and_licence(name: str) -> None:
    header = (KEDA / name).read_text().splitlines()[:2]
    assert f"github.com/kedacore/keda {KEDA_VERSION}" in header[0]
    assert "Apache License 2.0" in header[1]
    assert "Apache License" in Path(KEDA / "LICENSE").read_text()
