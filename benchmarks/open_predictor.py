"""The predictor as it was before API keys, for `benchmarks.serving` to compare against.

Serve it with `bentoml serve benchmarks.open_predictor:Predictor`: the same service, whose
guard lets every request in as the default tenant without asking for a key (what the
predictor did before it required identity). Benchmark only: nothing else imports it.
"""

from __future__ import annotations

from common.store.tenants import DEFAULT_TENANT, SCOPES, Identity
from services.predictor import identity, service
from services.predictor.guard import RequestGuard

ANONYMOUS = Identity(DEFAULT_TENANT, "none", frozenset(SCOPES))


class OpenGuard(RequestGuard):
    """The guard without the key check: body limits and docs as before, no 401/403."""

    async def _identify(
        self, gate: identity.Gate, headers: dict[str, str], needed: frozenset[str]
    ) -> Identity:
        return ANONYMOUS


Predictor = service.Predictor
Predictor.middlewares[:] = [  # type: ignore[attr-defined]
    (OpenGuard if cls is RequestGuard else cls, options)
    for cls, options in Predictor.middlewares  # type: ignore[attr-defined]
]
