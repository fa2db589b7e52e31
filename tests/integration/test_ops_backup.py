"""Backup and restore drills: `scripts.ops` against a real PostgreSQL and moto's S3 server.

A throwaway cluster holds the four databases of the stack (MLflow's with a registered model
whose `champion` alias points at an sklearn model in the `mlflow` bucket), an Evidently
workspace directory stands for the file state. Each drill makes a backup through the CLI
(`--pg-url`/`--s3-endpoint`, as against compose), damages either the backup or the live
data, and checks what `verify` and `restore` do.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from sklearn.linear_model import LogisticRegression

from common.localpg import LocalPostgres
from scripts.ops.target import table_counts
from scripts.stack import BUCKETS, DATABASES
from tests.servers import (
    FAKE_AWS_CREDS,
    VENV_BIN,
    S3Endpoint,
    Server,
    clean_env,
    free_port,
    http_ok,
    run_ok,
    throwaway_cluster,
)
from tests.workspace import ROOT

MODEL = "drill-model"
ROWS = 250


@dataclass(frozen=True)
class Live:
    """The live state the drills back up and damage."""

    pg: LocalPostgres
    s3: S3Endpoint
    evidently: Path

    @property
    def tracking_uri(self) -> str:
        return f"postgresql+psycopg://mlflow@127.0.0.1:{self.pg.port}/mlflow"

    def env(self) -> dict[str, str]:
        return clean_env(MLFLOW_S3_ENDPOINT_URL=self.s3.url, **self.s3.creds)

    def ops(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [
            sys.executable,
            *("-m", "scripts.ops", "--pg-url", self.pg.url("").rstrip("/")),
            *("--s3-endpoint", self.s3.url, "--state-dir", f"evidently={self.evidently}"),
            *args,
        ]
        proc = subprocess.run(
            cmd, cwd=ROOT, env=self.env(), capture_output=True, text=True, timeout=300, check=False
        )
        if check:
            assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def rows(self) -> int:
        with self.pg.connect("predictions") as conn:
            row = conn.execute("SELECT count(*) FROM predictions").fetchone()
        return int(row[0]) if row else -1

    def databases(self) -> set[str]:
        with self.pg.connect() as conn:
            return {str(r[0]) for r in conn.execute("SELECT datname FROM pg_database")}

    def keys(self, bucket: str = "mlflow") -> dict[str, bytes]:
        client = self.s3.client()
        return {
            key: client.get_object(Bucket=bucket, Key=key)["Body"].read()
            for key in self.s3.keys(bucket)
        }


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    moto = Server(
        "moto_server",
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        log_path=tmp_path_factory.mktemp("moto") / "moto.log",
        healthy=http_ok(f"{url}/moto-api/"),
        env=clean_env(),
    )
    evidently = Path(tempfile.mkdtemp(prefix="mlops-it-ops-evidently-"))
    with throwaway_cluster("ops", "postgres") as pg, moto.start():
        s3 = S3Endpoint(url, dict(FAKE_AWS_CREDS))
        for bucket in BUCKETS:
            s3.client().create_bucket(Bucket=bucket)
        live = Live(pg, s3, evidently)
        _seed(live)
        yield live


def _seed(live: Live) -> None:
    """The four databases (mlflow owned by its role, CONNECT for it only), a champion, files."""
    with live.pg.connect() as conn:
        conn.execute("CREATE ROLE mlflow LOGIN")
        for db in DATABASES:
            conn.execute(f"CREATE DATABASE {db}")
        conn.execute("ALTER DATABASE mlflow OWNER TO mlflow")
        conn.execute("REVOKE ALL ON DATABASE mlflow FROM PUBLIC")
        conn.execute("GRANT CONNECT ON DATABASE mlflow TO mlflow")
    with live.pg.connect("predictions") as conn:
        conn.execute("CREATE TABLE predictions (id serial PRIMARY KEY, score float8 NOT NULL)")
        conn.execute(
            "INSERT INTO predictions (score) SELECT random() FROM generate_series(1, %s)", [ROWS]
        )
    for db in ("prefect", "mlflow_auth"):
        with live.pg.connect(db) as conn:
            conn.execute("CREATE TABLE state (name text PRIMARY KEY, value jsonb)")
            conn.execute("INSERT INTO state VALUES ('a', '1'), ('b', '{\"x\": 2}')")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_S3_ENDPOINT_URL", live.s3.url)
        for name, value in live.s3.creds.items():
            env.setenv(name, value)
        previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
        mlflow.set_tracking_uri(live.tracking_uri)
        mlflow.set_registry_uri(live.tracking_uri)
        try:
            experiment = mlflow.create_experiment("drill", artifact_location="s3://mlflow/drill")
            x = np.random.default_rng(0).normal(size=(60, 3))
            model = LogisticRegression().fit(x, x[:, 0] > 0)
            with mlflow.start_run(experiment_id=experiment):
                info = mlflow.sklearn.log_model(
                    model, name="model", pip_requirements=["scikit-learn"]
                )
            version = mlflow.register_model(info.model_uri, MODEL)
            MlflowClient().set_registered_model_alias(MODEL, "champion", version.version)
        finally:
            mlflow.set_tracking_uri(previous[0])
            mlflow.set_registry_uri(previous[1])
    live.s3.client().put_object(Bucket="dvc", Key="files/md5/ab/cdef", Body=b"data")
    (live.evidently / "projects").mkdir()
    (live.evidently / "projects" / "p1.json").write_text('{"name": "monitor"}')
    (live.evidently / "snapshots.bin").write_bytes(bytes(range(256)) * 40)


def _backup(live: Live, dest: Path) -> dict[str, Any]:
    live.ops("backup", "--dest", str(dest))
    manifest: dict[str, Any] = json.loads((dest / "manifest.json").read_text())
    return manifest


def _no_leftovers(live: Live) -> None:
    """No restore copy and nothing renamed aside is left in the cluster."""
    names = live.databases()
    assert set(DATABASES) <= names
    assert not [n for n in names if "_restore_" in n or "_old_" in n], names


def test_the_manifest_lists_checksums_row_counts_objects_and_files(
    live: Live, tmp_path: Path
) -> None:
    manifest = _backup(live, tmp_path / "b")
    assert manifest["format"] == 2
    assert manifest["stopped"] == []
    assert set(manifest["databases"]) == set(DATABASES)
    predictions = manifest["databases"]["predictions"]
    assert predictions["tables"] == {"public.predictions": ROWS}
    assert len(predictions["sha256"]) == 64
    assert predictions["bytes"] > 0
    assert manifest["databases"]["mlflow"]["owner"] == "mlflow"
    assert manifest["databases"]["mlflow"]["tables"]["public.model_versions"] == 1
    objects = {o["key"]: o for o in manifest["buckets"]["mlflow"]["objects"]}
    assert set(objects) == set(live.keys("mlflow"))
    assert any(k.endswith("MLmodel") for k in objects)
    assert all(len(o["sha256"]) == 64 and o["etag"] for o in objects.values())
    files = {e["path"] for e in manifest["files"]["evidently"]["entries"]}
    assert files == {"projects/p1.json", "snapshots.bin"}
    assert any("grafana" in item for item in manifest["not_covered"])
    assert "complete and readable" in live.ops("verify", str(tmp_path / "b")).stdout


def test_a_truncated_dump_is_refused_by_verify_and_restore_before_any_database_is_touched(
    live: Live, tmp_path: Path
) -> None:
    dest = tmp_path / "b"
    _backup(live, dest)
    dump = dest / "predictions.dump"
    dump.write_bytes(dump.read_bytes()[: dump.stat().st_size // 2])
    with live.pg.connect("predictions") as conn:
        conn.execute("INSERT INTO predictions (score) VALUES (0.5)")  # live moved on
    for command in ("verify", "restore"):
        proc = live.ops(command, str(dest), check=False)
        assert proc.returncode == 1, proc.stdout
        assert f"{dump}: " in proc.stderr, proc.stderr
        assert "(truncated?)" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert live.rows() == ROWS + 1
    _no_leftovers(live)
    with live.pg.connect("predictions") as conn:
        conn.execute("DELETE FROM predictions WHERE id > %s", [ROWS])


def test_a_dump_that_does_not_read_is_refused_even_when_its_manifest_was_made_to_match(
    live: Live, tmp_path: Path
) -> None:
    dest = tmp_path / "b"
    _backup(live, dest)
    dump = dest / "mlflow.dump"
    dump.write_bytes(dump.read_bytes()[:-200])
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["databases"]["mlflow"]["bytes"] = dump.stat().st_size
    manifest["databases"]["mlflow"]["sha256"] = _sha256(dump)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    proc = live.ops("verify", str(dest), check=False)
    assert proc.returncode == 1
    assert f"reading the dump of mlflow ({dump})" in proc.stderr, proc.stderr


def test_a_corrupted_object_is_refused_by_verify_and_restore_and_the_bucket_is_left_alone(
    live: Live, tmp_path: Path
) -> None:
    dest = tmp_path / "b"
    manifest = _backup(live, dest)
    model = next(o for o in manifest["buckets"]["mlflow"]["objects"] if o["key"].endswith(".skops"))
    path = dest / model["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    live.s3.client().put_object(Bucket="mlflow", Key="drill/added-later.txt", Body=b"new")
    before = live.keys("mlflow")
    for command in ("verify", "restore"):
        proc = live.ops(command, str(dest), check=False)
        assert proc.returncode == 1
        assert f"{path}: SHA-256 differs from the manifest (corrupted)" in proc.stderr, proc.stderr
    assert live.keys("mlflow") == before
    assert live.rows() == ROWS
    _no_leftovers(live)
    live.s3.client().delete_object(Bucket="mlflow", Key="drill/added-later.txt")


def test_a_restore_whose_row_counts_differ_from_the_manifest_leaves_the_live_databases(
    live: Live, tmp_path: Path
) -> None:
    dest = tmp_path / "b"
    _backup(live, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["databases"]["prefect"]["tables"]["public.state"] = 3  # the dump has 2
    (dest / "manifest.json").write_text(json.dumps(manifest))
    with live.pg.connect("predictions") as conn:
        conn.execute("DELETE FROM predictions WHERE id <= 10")
    proc = live.ops("restore", str(dest), check=False)
    assert proc.returncode == 1
    assert "restore failed before anything live was touched" in proc.stderr, proc.stderr
    assert "public.state: 2 rows, manifest 3" in proc.stderr
    assert live.rows() == ROWS - 10  # the predictions copy restored first was not swapped in
    _no_leftovers(live)


def test_a_good_backup_restores_row_counts_exact_buckets_files_and_a_loadable_champion(
    live: Live, tmp_path: Path
) -> None:
    dest = tmp_path / "b"
    with live.pg.connect("predictions") as conn:
        row = conn.execute("SELECT count(*) FROM predictions").fetchone()
    rows = int(row[0]) if row else -1
    manifest = _backup(live, dest)
    objects = live.keys("mlflow")
    # Lose and change things after the backup.
    with live.pg.connect("predictions") as conn:
        conn.execute("DELETE FROM predictions")
    with live.pg.connect("mlflow") as conn:
        conn.execute("DELETE FROM registered_model_aliases")
    client = live.s3.client()
    client.put_object(Bucket="mlflow", Key="drill/added-later.txt", Body=b"new")
    changed = next(k for k in objects if k.endswith("MLmodel"))
    client.put_object(Bucket="mlflow", Key=changed, Body=b"overwritten")
    (live.evidently / "projects" / "p1.json").write_text("{}")
    (live.evidently / "extra.json").write_text("{}")

    out = live.ops("restore", str(dest)).stdout
    assert "verified:" in out

    assert live.rows() == rows
    for db, info in manifest["databases"].items():
        with live.pg.connect(db) as conn:
            assert table_counts(conn) == info["tables"], db
    assert live.keys("mlflow") == objects  # the later object is gone, the changed one is back
    assert live.keys("dvc") == {"files/md5/ab/cdef": b"data"}
    assert sorted(p.name for p in live.evidently.rglob("*") if p.is_file()) == [
        "p1.json",
        "snapshots.bin",
    ]
    assert (live.evidently / "projects" / "p1.json").read_text() == '{"name": "monitor"}'
    _no_leftovers(live)
    with live.pg.connect("mlflow") as conn:  # owner and CONNECT rights kept
        row = conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'runs'").fetchone()
        assert row == ("mlflow",)
        acl = conn.execute(
            "SELECT has_database_privilege('public', 'mlflow', 'CONNECT'),"
            " pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'mlflow'"
        ).fetchone()
    assert acl == (False, "mlflow")
    # A fresh client loads the champion from the restored registry and artifacts.
    load = (
        "import mlflow, numpy as np\n"
        f"mlflow.set_tracking_uri({live.tracking_uri!r})\n"
        f"m = mlflow.pyfunc.load_model('models:/{MODEL}@champion')\n"
        "print(len(m.predict(np.zeros((4, 3)))))\n"
    )
    assert run_ok([sys.executable, "-c", load], cwd=ROOT, env=live.env()).strip() == "4"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
