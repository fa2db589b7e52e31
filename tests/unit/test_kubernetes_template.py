"""infra/kubernetes/base-job-template.json: the `kubernetes` work pool's job, checked offline.

The template is filled as a Kubernetes worker fills it for a flow run (Prefect's own
templating, the variables' defaults, the values the worker adds), and the Job it makes
is validated against the Kubernetes API's JSON schema that `kubernetes-validate` ships.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
from prefect.utilities.templating import apply_values, find_placeholders

from tests.workspace import ROOT

pytestmark = pytest.mark.unit

TEMPLATE: dict[str, Any] = json.loads(
    (ROOT / "infra/kubernetes/base-job-template.json").read_text()
)
KUBERNETES = ["1.30.0", "1.33.0", kubernetes_validate.latest_version()]
"""The API versions the Job must be valid in: an older supported cluster and the newest."""
WORKER_VALUES = {
    # What a Kubernetes worker adds for a flow run (prefect-kubernetes' job configuration):
    # the run's name and labels, the command that executes it, Prefect's variables.
    "name": "retrain-acme",
    "command": ["prefect", "flow-run", "execute"],
    "labels": {
        "prefect.io/flow-run-id": "0b2f4a4e-5f05-4cf6-9d4e-6f8c2c1f7a10",
        "prefect.io/deployment-name": "retrain",
    },
    "env": [
        {"name": "MLOPS_PROJECT_DIR", "value": "/app"},
        {"name": "PREFECT__FLOW_RUN_ID", "value": "0b2f4a4e-5f05-4cf6-9d4e-6f8c2c1f7a10"},
    ],
}


def _defaults() -> dict[str, Any]:
    properties = TEMPLATE["variables"]["properties"]
    return {name: spec["default"] for name, spec in properties.items() if "default" in spec}


def job_manifest(**overrides: Any) -> dict[str, Any]:
    """The Job a worker submits for one flow run, with the pool's defaults or `overrides`."""
    config = apply_values(TEMPLATE["job_configuration"], _defaults() | WORKER_VALUES | overrides)
    assert isinstance(config, dict)
    manifest: dict[str, Any] = config["job_manifest"]
    return manifest


@pytest.mark.parametrize("version", KUBERNETES)
def test_the_job_a_worker_submits_is_a_valid_kubernetes_job(version: str) -> None:
    kubernetes_validate.validate(job_manifest(), version, strict=True)


def test_a_wrong_field_in_the_job_is_caught_offline() -> None:
    """The check has teeth: a memory limit that is a list is refused by the schema."""
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(
            job_manifest(memory_limit=["4Gi"]), kubernetes_validate.latest_version(), strict=True
        )


def test_every_placeholder_is_a_variable_with_a_valid_schema() -> None:
    variables = TEMPLATE["variables"]
    jsonschema.Draft7Validator.check_schema(variables)
    used = {p.name for p in find_placeholders(TEMPLATE["job_configuration"])}
    assert used <= set(variables["properties"]), used - set(variables["properties"])
    jsonschema.validate(_defaults(), variables)


def test_the_job_runs_the_flows_image_as_non_root_with_bounded_resources() -> None:
    pod = job_manifest()["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's `app` user
    assert container["resources"]["limits"] == {"cpu": "2", "memory": "4Gi"}
    # secrets come from a Secret by reference, never as literal values in the template
    assert container["envFrom"] == [{"secretRef": {"name": "mlops-flows-env"}}]
    assert container["args"] == WORKER_VALUES["command"]
