"""Fan-out: one flow run per tenant, queued on a deployment's work pool, not waited for.

Prefect does the scheduling: each run waits in its work pool's queue until a worker picks
it up and, for a deployment with a `concurrency_limit` (prefect.yaml), until a slot is
free, so N tenants' runs never start at once. Nothing here loops, polls or sleeps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment

SHARED = "shared"
"""How run names and tags spell tenant None: the shared model."""


def label(tenant: str | None) -> str:
    return SHARED if tenant is None else tenant


def queue(deployment: str, tenant: str | None, parameters: Mapping[str, Any]) -> FlowRun:
    """Queue one run of `deployment` ("flow/deployment") for `tenant`; return it at once.

    The run gets `tenant` as its parameter, `<flow>-<tenant>` as its name and the tag
    `tenant:<tenant>` (filter on it in the UI).
    """
    flow = deployment.split("/", 1)[0]
    run = run_deployment(
        deployment,
        parameters={**parameters, "tenant": tenant},
        flow_run_name=f"{flow}-{label(tenant)}",
        tags=[f"tenant:{label(tenant)}"],
        timeout=0,
    )
    assert isinstance(run, FlowRun)  # the sync call: a flow or task body, not async code
    return run
