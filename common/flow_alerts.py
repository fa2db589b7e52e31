"""Failed flow runs page the webhook drift alerts go to (MONITOR_WEBHOOK_URL), Prefect's way.

A Webhook block `mlops-alerts` holds the URL, and an Automation `mlops-flow-run-failed`
calls it whenever any flow run of the workspace enters Failed, Crashed or TimedOut (the
pipeline, a retrain, a promotion, a rollout, batch scoring, the monitor itself). Both show
in the Prefect UI (Blocks, Automations), where they can be paused or pointed elsewhere.
`make deploy` applies them after `prefect deploy --all`; applying again updates them in
place. Without MONITOR_WEBHOOK_URL nothing is created: failed runs show in the Prefect UI.

    python -m common.flow_alerts          # needs PREFECT_API_URL, like `prefect deploy`
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from uuid import UUID

from prefect.automations import Automation
from prefect.blocks.webhook import Webhook
from prefect.events.actions import CallWebhook
from prefect.events.schemas.automations import EventTrigger, Posture

from common.errors import run_cli
from common.settings import Settings, get_settings

BLOCK = "mlops-alerts"
AUTOMATION = "mlops-flow-run-failed"
FAILED = ("prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut")
PAYLOAD = """\
{
  "alert": "flow-run-failed",
  "flow": {{ flow.name | tojson }},
  "flow_run": {{ flow_run.name | tojson }},
  "flow_run_id": "{{ flow_run.id }}",
  "deployment": {{ (deployment.name if deployment else none) | tojson }},
  "state": {{ flow_run.state.name | tojson }},
  "message": {{ flow_run.state.message | tojson }},
  "url": {{ flow_run | ui_url | tojson }}
}"""
"""The JSON body (a Jinja template the automation fills from the flow run's event)."""


def _automation(block_id: UUID) -> Automation:
    return Automation(
        name=AUTOMATION,
        description="A flow run failed, crashed or timed out: POST it to MONITOR_WEBHOOK_URL "
        "(common/flow_alerts.py)",
        trigger=EventTrigger(
            expect=set(FAILED),
            match={"prefect.resource.id": "prefect.flow-run.*"},
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[CallWebhook(block_document_id=block_id, payload=PAYLOAD)],
    )


async def _apply(url: str) -> UUID:
    webhook = Webhook(method="POST", url=url, headers={"content-type": "application/json"})
    wanted = _automation(await webhook.asave(BLOCK, overwrite=True))
    try:
        existing: Automation | None = await Automation.aread(name=AUTOMATION)
    except ValueError:  # not made yet
        existing = None
    if existing is None:
        wanted = await wanted.acreate()
    else:
        wanted.id = existing.id
        await wanted.aupdate()
    if wanted.id is None:
        raise RuntimeError(f"the Prefect API gave automation {AUTOMATION} no id")
    return wanted.id


def apply(url: str) -> UUID:
    """Save the webhook block and create or update the automation; the automation's id."""
    return asyncio.run(_apply(url))


def main(settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    url = settings.monitor_webhook_url
    if not url:
        print(
            f"flow-alerts: MONITOR_WEBHOOK_URL is not set: no {AUTOMATION} automation; "
            "failed flow runs show in the Prefect UI only"
        )
        return
    automation = apply(url)
    print(
        f"flow-alerts: automation {AUTOMATION} ({automation}) POSTs failed, crashed and "
        f"timed-out flow runs to the {BLOCK} webhook block (MONITOR_WEBHOOK_URL)"
    )


if __name__ == "__main__":
    run_cli(main)
