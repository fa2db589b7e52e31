"""Signed approvals: what a reviewer's signature proves, and what it does not."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key

from common import approvals
from common.cli import main as mlops
from common.errors import UserError

pytestmark = pytest.mark.unit

REQUEST = approvals.Request(
    "6f1c1f1e-0000-4000-8000-000000000001",
    "staging",
    "churn-classifier-staging",
    "3",
    "prod",
)


def later() -> datetime:
    """An hour from when the test runs (not from collection: a run may reach it much later)."""
    return datetime.now(UTC) + timedelta(hours=1)


def _key(path: Path) -> tuple[Ed25519PrivateKey, str]:
    """A new key written as `ssh-keygen -t ed25519` would (path, path.pub); its public line."""
    key = Ed25519PrivateKey.generate()
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    line = f"{public.decode()} {path.name}@laptop"
    path.with_suffix(".pub").write_text(line + "\n")
    return key, line


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Ed25519PrivateKey]:
    """alice and bob registered in tmp_path/reviewers; mallory's key registered nowhere."""
    found = {}
    for name in ("alice", "bob", "mallory"):
        key, line = _key(tmp_path / f"{name}_ed25519")
        found[name] = key
        if name != "mallory":
            approvals.add_reviewer(tmp_path / "reviewers", name, line)
    return found


def _reviewers(tmp_path: Path) -> dict[str, approvals.Reviewer]:
    return approvals.load_reviewers(tmp_path / "reviewers")


def test_a_registered_reviewers_signature_over_the_request_verifies(
    tmp_path: Path, keys: dict[str, Ed25519PrivateKey]
) -> None:
    answer = approvals.sign(keys["alice"], REQUEST, "alice", approvals.APPROVE, later())

    approvals.verify(_reviewers(tmp_path), REQUEST, answer)


def test_the_signed_message_names_flow_run_source_target_decision_reviewer_and_expiry() -> None:
    text = approvals.message(REQUEST, "alice", "approve", "2026-12-02T15:00:00Z").decode()

    assert text == (
        "mlops-promotion-approval/1\n"
        "flow-run: 6f1c1f1e-0000-4000-8000-000000000001\n"
        "source: staging churn-classifier-staging 3\n"
        "target: prod\n"
        "decision: approve\n"
        "reviewer: alice\n"
        "expires: 2026-12-02T15:00:00Z\n"
    )


@pytest.mark.parametrize(
    "change",
    [
        {"flow_run_id": "6f1c1f1e-0000-4000-8000-000000000002"},
        {"source_version": "4"},
        {"source_model": "churn-classifier-staging.acme"},
        {"target_env": "staging"},
    ],
)
def test_a_signature_for_another_request_is_refused(
    tmp_path: Path, keys: dict[str, Ed25519PrivateKey], change: dict[str, str]
) -> None:
    answer = approvals.sign(keys["alice"], REQUEST, "alice", approvals.APPROVE, later())

    with pytest.raises(approvals.RefusedApprovalError, match="not 'alice''s"):
        approvals.verify(_reviewers(tmp_path), dataclasses.replace(REQUEST, **change), answer)


def test_a_rejection_cannot_be_turned_into_an_approval(
    tmp_path: Path, keys: dict[str, Ed25519PrivateKey]
) -> None:
    answer = approvals.sign(keys["alice"], REQUEST, "alice", approvals.REJECT, later())

    with pytest.raises(approvals.RefusedApprovalError, match="signature"):
        approvals.verify(
            _reviewers(tmp_path), REQUEST, dataclasses.replace(answer, decision="approve")
        )


def test_a_signature_under_another_reviewers_name_is_refused(
    tmp_path: Path, keys: dict[str, Ed25519PrivateKey]
) -> None:
    """bob signs claiming to be alice: the signature is checked against alice's key."""
    forged = approvals.sign(keys["bob"], REQUEST, "alice", approvals.APPROVE, later())

    with pytest.raises(approvals.RefusedApprovalError, match="not 'alice''s"):
        approvals.verify(_reviewers(tmp_path), REQUEST, forged)


def test_an_unregistered_key_or_name_is_refused(
    tmp_path: Path, keys: dict[str, Ed25519PrivateKey]
) -> None:
    answer = approvals.sign(keys["mallory"], REQUEST, "mallory", approvals.APPROVE, later())

    with pytest.raises(approvals.RefusedApprovalError, match="'mallory' is not a registered"):
        approvals.verify(_reviewers(tmp_path), REQUEST, answer)
    with pytest.raises(UserError, match="no registered reviewer"):
        approvals.reviewer_of(_reviewers(tmp_path), keys["mallory"])


def test_an_expired_approval_is_refused(tmp_path: Path, keys: dict[str, Ed25519PrivateKey]) -> None:
    expires = later()
    answer = approvals.sign(keys["alice"], REQUEST, "alice", approvals.APPROVE, expires)

    with pytest.raises(approvals.RefusedApprovalError, match="expired"):
        approvals.verify(_reviewers(tmp_path), REQUEST, answer, now=expires + timedelta(seconds=1))


def test_a_garbled_signature_is_refused_not_a_crash(
    tmp_path: Path, keys: dict[str, Ed25519PrivateKey]
) -> None:
    answer = approvals.sign(keys["alice"], REQUEST, "alice", approvals.APPROVE, later())

    for bad in ("not base64!", "AAAA"):
        with pytest.raises(approvals.RefusedApprovalError):
            approvals.verify(
                _reviewers(tmp_path), REQUEST, dataclasses.replace(answer, signature=bad)
            )


def test_the_reviewer_is_found_by_their_key(
    tmp_path: Path, keys: dict[str, Ed25519PrivateKey]
) -> None:
    assert approvals.reviewer_of(_reviewers(tmp_path), keys["bob"]) == "bob"


def test_a_malformed_reviewers_line_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "reviewers"
    _, line = _key(tmp_path / "carol_ed25519")
    path.write_text(f"# reviewers\ncarol {line}\n\ndave ssh-ed25519 not-a-key\n")

    with pytest.raises(UserError, match=rf"^{path}:4: not an OpenSSH public key"):
        approvals.load_reviewers(path)

    path.write_text(f"carol {line}\n{line}\n")
    with pytest.raises(UserError, match=rf"^{path}:2: expected `<name> ssh-ed25519"):
        approvals.load_reviewers(path)


def test_only_ed25519_keys_may_register(tmp_path: Path) -> None:
    rsa = generate_private_key(public_exponent=65537, key_size=2048).public_key()
    text = rsa.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)

    with pytest.raises(UserError, match="ssh-ed25519"):
        approvals.add_reviewer(tmp_path / "reviewers", "erin", text.decode())


def test_a_key_made_by_ssh_keygen_signs_and_an_encrypted_one_is_a_clear_error(
    tmp_path: Path,
) -> None:
    plain, locked = tmp_path / "id_ed25519", tmp_path / "locked_ed25519"
    for path, passphrase in ((plain, ""), (locked, "correct horse")):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", "x", "-f", str(path)],
            check=True,
        )
    approvals.add_reviewer(tmp_path / "reviewers", "alice", plain.with_suffix(".pub").read_text())
    key = approvals.load_private_key(plain)
    answer = approvals.sign(key, REQUEST, "alice", approvals.APPROVE, later())

    approvals.verify(_reviewers(tmp_path), REQUEST, answer)
    if importlib.util.find_spec("bcrypt") is None:
        with pytest.raises(UserError, match=rf"^{locked} is encrypted.*bcrypt"):
            approvals.load_private_key(locked, lambda: "correct horse")
    else:
        approvals.load_private_key(locked, lambda: "correct horse")


def test_mlops_reviewers_add_list_remove(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from common.settings import get_settings  # noqa: PLC0415

    monkeypatch.setenv("MLOPS_REVIEWERS_FILE", str(tmp_path / "reviewers"))
    get_settings.cache_clear()
    _key(tmp_path / "alice_ed25519")
    try:
        mlops(["reviewers", "add", "alice", str(tmp_path / "alice_ed25519.pub")])
        mlops(["reviewers", "list"])
        assert capsys.readouterr().out.startswith("alice ssh-ed25519 AAAA")
        with pytest.raises(UserError, match="already"):
            mlops(["reviewers", "add", "alice", str(tmp_path / "alice_ed25519.pub")])
        mlops(["reviewers", "remove", "alice"])
        assert approvals.load_reviewers(tmp_path / "reviewers") == {}
        with pytest.raises(UserError, match="no reviewer 'alice'"):
            mlops(["reviewers", "remove", "alice"])
    finally:
        get_settings.cache_clear()
