"""What can be checked of the compose stack without a Docker engine (none runs here).

The compose file against the compose-spec schema, its internal references, its
variables against .env.example, healthchecks and start-up ordering.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "infra/docker/compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
ONE_SHOT = {"minio-init"}
VAR = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::?[-?][^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def test_compose_file_matches_the_compose_specification() -> None:
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_depends_on_names_existing_services_with_health_conditions(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        for target, spec in svc.get("depends_on", {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            want = "service_completed_successfully" if target in ONE_SHOT else "service_healthy"
            assert spec["condition"] == want, f"{name} -> {target}"


def test_every_server_has_a_healthcheck_and_restart_policy(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        if name in ONE_SHOT:
            continue
        assert "healthcheck" in svc, name
        assert svc.get("restart") == "unless-stopped", name


def test_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes", {}))
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name} uses undeclared volume {source}"


def test_every_variable_is_documented_in_env_example() -> None:
    used = set(VAR.findall(COMPOSE.read_text()))
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.M))
    assert used - documented == set()


def test_secrets_have_no_defaults_and_fail_fast() -> None:
    text = COMPOSE.read_text()
    for secret in ("POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY"):
        assert f"${{{secret}:-" not in text
        assert f"${{{secret}:?" in text
    env = ENV_EXAMPLE.read_text()
    assert re.search(r"^POSTGRES_PASSWORD=$", env, re.M)
    assert re.search(r"^AWS_SECRET_ACCESS_KEY=$", env, re.M)


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        image = svc.get("image", "")
        if "build" in svc:
            continue
        assert ":" in image, name
        assert not image.endswith(":latest"), name


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    for dockerfile in sorted((ROOT / "infra/docker").glob("Dockerfile*")):
        proc = subprocess.run(
            [str(hadolint), "--no-color", str(dockerfile)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_runs_as_non_root_from_pinned_bases() -> None:
    text = (ROOT / "infra/docker/Dockerfile").read_text()
    assert re.search(r"^USER 10001", text, re.M)
    for base in re.findall(r"^(?:ARG PYTHON_IMAGE=|FROM )(\S+)", text, re.M):
        if base.startswith("${") or base in {"uv", "build", "runtime"}:
            continue
        assert re.search(r":\d+\.\d+", base), base
