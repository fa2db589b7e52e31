"""The demo's last step: a canary of the retrained version, judged on live traffic.

The register stage's gate made acme's new version its `challenger` (params.yaml:
`tenants.acme.rollout.canary`). While the rollout flow (`flows.rollout`) ramps it (10% of
acme's customers, then 50%, then all) a client of acme sends requests one customer at a
time (`X-Entity-Key`: the customer's id, so a customer keeps its variant) and the true label
of each answer soon after (`/feedback`), as a real client's outcomes arrive. The flow
compares the variants on those live numbers at each step and promotes the challenger
through the one promotion path, or rolls it back.
"""

from __future__ import annotations

import threading
import time
import urllib.error
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flows.rollout import Outcome, rollout

Request = Callable[..., Any]
"""`scripts.loop._request`: (url, body=None, key=None, timeout=..., headers=...) -> JSON."""


@dataclass
class CanaryClient:
    """One tenant's customers calling one at a time, each answer labelled right after."""

    url: str
    key: str
    records: Sequence[dict[str, Any]]
    labels: Sequence[str]
    entities: Sequence[str]
    request: Request
    pause: float = 0.0
    answered: Counter[str] = field(default_factory=Counter)
    """Answers per variant."""
    versions: Counter[str] = field(default_factory=Counter)
    """Answers per `variant vN`."""
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    threads: int = 2
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for n in range(self.threads):
            thread = threading.Thread(
                target=self._run, args=(n,), name=f"canary-client-{n}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _run(self, offset: int) -> None:
        i = offset
        while not self._stop.is_set():
            j = i % len(self.records)
            i += self.threads
            try:
                answer = self.request(
                    f"{self.url}/predict",
                    {"records": [self.records[j]]},
                    self.key,
                    timeout=10,
                    headers={"X-Entity-Key": self.entities[j]},
                )
                variant = str(answer.get("variant", "champion"))
                with self._lock:
                    self.answered[variant] += 1
                    self.versions[f"{variant} v{answer['model_version']}"] += 1
                rid = answer["predictions"][0]["request_id"]
                self.request(
                    f"{self.url}/feedback",
                    {"request_id": rid, "label": self.labels[j]},
                    self.key,
                    timeout=10,
                )
            except (urllib.error.URLError, OSError, KeyError, ValueError) as exc:
                with self._lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
            if self.pause:
                time.sleep(self.pause)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)

    @property
    def requests(self) -> int:
        return sum(self.answered.values()) + len(self.failures)


@dataclass(frozen=True)
class CanaryOutcome:
    """The rollout as the demo saw it: the flow's verdicts and the client's answers."""

    model_name: str
    champion: str
    challenger: str
    outcome: str
    """`promoted`, `rolled back` or `held`."""
    reason: str
    steps: list[dict[str, Any]]
    """Each judged step: weight, action, and each variant's live numbers."""
    answered: dict[str, int]
    """The client's answers per `variant vN`."""
    requests: int
    failed: int


def run_canary(client: CanaryClient, tenant: str | None) -> CanaryOutcome:
    """Run the rollout flow for `tenant`'s model while `client` sends its traffic."""
    client.start()
    try:
        result: Outcome = rollout(tenant=tenant)
    finally:
        client.stop()
    return CanaryOutcome(
        result.model_name,
        result.champion,
        result.challenger,
        result.outcome,
        result.reason,
        [
            {
                "step": s.step,
                "weight": s.weight,
                "action": s.action,
                "champion": s.champion,
                "challenger": s.challenger,
            }
            for s in result.steps
        ],
        dict(sorted(client.versions.items())),
        client.requests,
        len(client.failures),
    )
