"""`make demo`'s tenants on a real PostgreSQL: a second demo finds the first one's tenants,
and only the keys of the latest run work."""

from __future__ import annotations

import uuid

import pytest

from common.localpg import LocalPostgres
from common.store import migrate, tenants
from models.generate import EXAMPLE_TENANTS
from scripts.loop import setup_tenants

pytestmark = pytest.mark.integration


def test_a_second_demo_keeps_the_tenants_and_ends_the_first_demos_keys(
    postgres: LocalPostgres,
) -> None:
    postgres.start()
    name = f"demo_{uuid.uuid4().hex[:12]}"
    postgres.create_database(name)
    url = postgres.url(name)
    migrate(url)

    first = setup_tenants(url, EXAMPLE_TENANTS)
    second = setup_tenants(url, EXAMPLE_TENANTS)

    listed = {t.id: t for t in tenants.list_tenants(url)}
    assert set(listed) == {"default", "acme", "globex"}
    assert listed["globex"].name == "Globex Corporation"
    for tenant in ("acme", "globex"):
        assert listed[tenant].live_keys == 1
        assert tenants.authenticate(url, first[tenant]) is None
        who = tenants.authenticate(url, second[tenant])
        assert who is not None
        assert (who.tenant_id, who.scopes) == (tenant, frozenset(tenants.DEFAULT_SCOPES))
    assert first["acme"] != second["acme"] != second["globex"]
