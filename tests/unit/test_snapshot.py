"""snapshot: a tenant's own source read into its DVC-tracked file, or one paragraph why not.

Files are real files; the unreachable database is a closed local port (nothing listens).
A SQL source against a real PostgreSQL is in tests/integration/test_tenant_sources.py.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from common import paths
from common import snapshot as reader
from common.errors import UserError
from common.params import Params, TenantSource, stage_tenant
from common.settings import Settings
from models import snapshot
from models.generate import example_tenant, tenant_source
from tests.servers import free_port


@pytest.fixture
def settings() -> Settings:
    return Settings()


def test_snapshot_keeps_the_contract_columns_of_a_csv_source_with_their_types(
    params: Params, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    rows = tenant_source("acme", 200).assign(crm_note="called twice")
    rows.to_csv("acme.csv", index=False)
    source = TenantSource(path="acme.csv")
    tenants = Params.model_validate(
        params.model_dump(by_alias=True) | {"tenants": {"acme": {"source": source.model_dump()}}}
    )

    result = snapshot.run("acme", tenants, settings)

    written = pd.read_parquet(paths.layout("acme").SNAPSHOT)
    assert result.path == paths.layout("acme").SNAPSHOT
    assert (result.rows, result.dropped) == (200, ["crm_note"])
    assert list(written.columns) == snapshot.contract_columns(params.data)
    assert pd.api.types.is_numeric_dtype(written["tenure_months"])  # not CSV text
    assert written["customer_id"].str.startswith("acme-").all()
    assert paths.layout("acme").PRODUCTION.is_dir()  # prepare@acme's dependency exists


def test_a_source_missing_contract_columns_names_tenant_source_and_columns(
    params: Params,
) -> None:
    source = TenantSource(sql="SELECT id, churn FROM crm.customers", url_env="ACME_DB_URL")
    frame = pd.DataFrame({"id": [1], "churn": [0]})

    with pytest.raises(UserError) as raised:
        snapshot.select(frame, params.data, "acme", source)

    message = str(raised.value)
    assert message.startswith(
        "tenant 'acme', source SQL via $ACME_DB_URL: SELECT id, churn FROM crm.customers: "
        "the data lacks column(s) ['customer_id', 'tenure_months'"
    )
    assert "it has ['id', 'churn']" in message
    assert "Nothing after snapshot ran" in message


def test_a_missing_file_names_the_tenant_and_the_path_once(settings: Settings) -> None:
    with pytest.raises(UserError) as raised:
        reader.read("acme", TenantSource(path="nowhere/acme.parquet"), settings)

    assert str(raised.value) == "tenant 'acme', source nowhere/acme.parquet: no such file"


def test_an_unset_url_variable_is_named_not_guessed(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ACME_DB_URL", raising=False)
    source = TenantSource(sql="SELECT * FROM customers", url_env="ACME_DB_URL")

    with pytest.raises(UserError) as raised:
        reader.read("acme", source, settings)

    assert str(raised.value).startswith(
        "tenant 'acme', source SQL via $ACME_DB_URL: SELECT * FROM customers: the environment "
        "variable ACME_DB_URL (`url_env`) is not set"
    )


def test_an_unreachable_database_names_tenant_source_and_variable_never_the_url(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"postgresql://reader:s3cret@127.0.0.1:{free_port()}/crm"
    monkeypatch.setenv("ACME_DB_URL", url)
    source = TenantSource(sql="SELECT * FROM customers", url_env="ACME_DB_URL")

    with pytest.raises(UserError) as raised:
        reader.read("acme", source, settings)

    message = str(raised.value)
    assert message.startswith(
        "tenant 'acme', source SQL via $ACME_DB_URL: SELECT * FROM customers: cannot connect "
        "to the database in ACME_DB_URL ("
    )
    assert "s3cret" not in message


def test_the_url_variable_may_come_from_the_dotenv_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = tmp_path / "settings.env"
    env.write_text("ACME_DB_URL=postgresql://reader@db/crm\n")
    monkeypatch.setenv("MLOPS_ENV_FILE", str(env))
    monkeypatch.delenv("ACME_DB_URL", raising=False)

    assert Settings().variable("ACME_DB_URL") == "postgresql://reader@db/crm"
    monkeypatch.setenv("ACME_DB_URL", "postgresql://reader@other/crm")
    assert Settings().variable("ACME_DB_URL") == "postgresql://reader@other/crm"
    assert Settings().variable("GLOBEX_DB_URL") is None


def test_a_stage_takes_its_tenant_from_the_command_line() -> None:
    assert stage_tenant(["--tenant", "acme"]) == "acme"
    assert stage_tenant([]) is None
    with pytest.raises(SystemExit):
        stage_tenant([], required=True)


def test_an_example_tenants_own_data_is_none_of_the_demo_traffic() -> None:
    own = set(tenant_source("acme", 500)["customer_id"])
    for batch in (0, 1, 99):
        assert not own & set(example_tenant("acme").traffic(500, batch=batch)["customer_id"])
