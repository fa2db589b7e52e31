"""Signed approvals: who may let a version into prod, and proof that they did.

A reviewer is a name and an Ed25519 public key in OpenSSH format, one per line of the
reviewers file (MLOPS_REVIEWERS_FILE, default MLOPS_HOME/reviewers), as git's
allowed_signers: `alice ssh-ed25519 AAAA... alice@laptop`. An approval is the reviewer's
signature over one canonical message naming everything it decides: the Prefect flow run
that asked, the source environment, registered model and version, the target environment,
approve or reject, the reviewer and an expiry. A signature therefore cannot be replayed on
another flow run, another version, another target, after its expiry, or under another
reviewer's name; a free-text "reviewer" field proves nothing, a key does.
"""

from __future__ import annotations

import base64
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.errors import UserError

Decision = Literal["approve", "reject"]
APPROVE: Decision = "approve"
REJECT: Decision = "reject"
MESSAGE_HEADER = "mlops-promotion-approval/1"
"""First line of every signed message: a signature over anything else never verifies."""
KEY_TYPE = "ssh-ed25519"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")
REQUEST_KEY = "approval-request"
"""The Prefect flow run input where a waiting promote_environment run leaves its Request,
which `mlops approve` reads and signs."""


class RefusedApprovalError(UserError):
    """An approval that does not prove what it claims (bad signature, unknown reviewer,
    expired, another flow run's)."""


@dataclass(frozen=True)
class Request:
    """What the promote flow asks a reviewer to decide."""

    flow_run_id: str
    source_env: str
    source_model: str
    source_version: str
    target_env: str

    def describe(self) -> str:
        return (
            f"{self.source_model} v{self.source_version} ({self.source_env}) -> "
            f"{self.target_env}, flow run {self.flow_run_id}"
        )


@dataclass(frozen=True)
class Answer:
    """A reviewer's signed answer, as the CLI sends it to the paused flow run."""

    reviewer: str
    decision: Decision
    expires: str
    """UTC, ISO 8601 (what was signed)."""
    signature: str
    """Base64 Ed25519 signature over `message(request, reviewer, decision, expires)`."""


@dataclass(frozen=True)
class Reviewer:
    name: str
    key: Ed25519PublicKey
    line: str
    """Its line in the reviewers file, as written."""


def expiry(at: datetime) -> str:
    """The canonical form of an expiry: UTC to the second, `Z`."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def message(request: Request, reviewer: str, decision: str, expires: str) -> bytes:
    """The exact bytes a reviewer signs: one `field: value` a line, in a fixed order."""
    fields = {
        "flow-run": request.flow_run_id,
        "source": f"{request.source_env} {request.source_model} {request.source_version}",
        "target": request.target_env,
        "decision": decision,
        "reviewer": reviewer,
        "expires": expires,
    }
    for field, value in fields.items():
        if not value or any(c in value for c in "\r\n"):
            raise UserError(f"approval field {field!r} must be one non-empty line")
    return ("\n".join([MESSAGE_HEADER, *(f"{k}: {v}" for k, v in fields.items())]) + "\n").encode()


def parse_public_key(text: str, where: str) -> Ed25519PublicKey:
    """An `ssh-ed25519 AAAA... [comment]` public key; a UserError naming `where` otherwise."""
    try:
        key = serialization.load_ssh_public_key(text.strip().encode())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise UserError(f"{where}: not an OpenSSH public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UserError(f"{where}: only {KEY_TYPE} keys may sign approvals")
    return key


def load_reviewers(path: Path) -> dict[str, Reviewer]:
    """The registered reviewers by name; a missing file is none. A malformed line is a
    UserError naming the file and the line."""
    if not path.is_file():
        return {}
    found: dict[str, Reviewer] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        name, _, key_text = line.partition(" ")
        if not NAME.match(name) or not key_text.strip().startswith(KEY_TYPE + " "):
            raise UserError(
                f"{where}: expected `<name> {KEY_TYPE} AAAA... [comment]`, got {line[:60]!r}"
            )
        if name in found:
            raise UserError(f"{where}: reviewer {name!r} is listed twice")
        found[name] = Reviewer(name, parse_public_key(key_text, where), line)
    return found


def add_reviewer(path: Path, name: str, public_key: str) -> Reviewer:
    """Register `name` with `public_key` (OpenSSH text); a name already there is an error."""
    if not NAME.match(name):
        raise UserError(f"reviewer name {name!r}: letters, digits and ._@+- only, 64 at most")
    key_text = " ".join(public_key.split())
    parse_public_key(key_text, "the public key")
    reviewers = load_reviewers(path)
    if name in reviewers:
        raise UserError(f"reviewer {name!r} is already in {path}; remove it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    line = f"{name} {key_text}"
    existing = path.read_text() if path.is_file() else ""
    separator = "" if not existing or existing.endswith("\n") else "\n"
    path.write_text(f"{existing}{separator}{line}\n")
    return load_reviewers(path)[name]


def remove_reviewer(path: Path, name: str) -> None:
    """Drop `name`'s line; an unknown name is an error."""
    if name not in load_reviewers(path):
        raise UserError(f"no reviewer {name!r} in {path}")
    kept = [
        line for line in path.read_text().splitlines() if line.strip().partition(" ")[0] != name
    ]
    path.write_text("".join(f"{line}\n" for line in kept))


def load_private_key(
    path: Path, ask_passphrase: Callable[[], str] | None = None
) -> Ed25519PrivateKey:
    """An OpenSSH Ed25519 private key (`ssh-keygen -t ed25519`); `ask_passphrase` is called
    when the key is encrypted."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read the key ({exc.strerror})") from None
    try:
        try:
            key = serialization.load_ssh_private_key(data, password=None)
        except TypeError:  # encrypted: it needs its passphrase (and bcrypt, its KDF)
            if importlib.util.find_spec("bcrypt") is None:
                raise UserError(
                    f"{path} is encrypted, and reading encrypted OpenSSH keys needs the bcrypt "
                    "package, which this install lacks: sign with a key without a passphrase "
                    "kept for approvals (ssh-keygen -t ed25519 -N '' -f ~/.ssh/mlops_approval)"
                ) from None
            if ask_passphrase is None:
                raise
            key = serialization.load_ssh_private_key(data, password=ask_passphrase().encode())
    except TypeError as exc:
        raise UserError(f"{path}: {exc}") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise UserError(f"{path}: not an OpenSSH private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UserError(f"{path}: only {KEY_TYPE} keys may sign approvals")
    return key


def reviewer_of(reviewers: dict[str, Reviewer], key: Ed25519PrivateKey) -> str:
    """The registered reviewer whose public key is `key`'s; a UserError if none is."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    for reviewer in reviewers.values():
        mine = reviewer.key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        if mine == raw:
            return reviewer.name
    raise UserError("this key belongs to no registered reviewer (mlops reviewers list)")


def sign(
    key: Ed25519PrivateKey,
    request: Request,
    reviewer: str,
    decision: Decision,
    expires: datetime,
) -> Answer:
    """The reviewer's signed answer to `request`, valid until `expires`."""
    until = expiry(expires)
    signature = key.sign(message(request, reviewer, decision, until))
    return Answer(reviewer, decision, until, base64.b64encode(signature).decode())


def verify(
    reviewers: dict[str, Reviewer],
    request: Request,
    answer: Answer,
    *,
    now: datetime | None = None,
) -> None:
    """Accept `answer` only if its reviewer is registered, its signature is theirs over this
    request, and it has not expired; RefusedApprovalError (saying which) otherwise."""
    reviewer = reviewers.get(answer.reviewer)
    if reviewer is None:
        raise RefusedApprovalError(f"{answer.reviewer!r} is not a registered reviewer")
    if answer.decision not in (APPROVE, REJECT):
        raise RefusedApprovalError(f"decision {answer.decision!r} is neither approve nor reject")
    try:
        until = datetime.strptime(answer.expires, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        signature = base64.b64decode(answer.signature, validate=True)
    except ValueError as exc:
        raise RefusedApprovalError(f"malformed approval from {answer.reviewer!r}: {exc}") from None
    try:
        reviewer.key.verify(
            signature, message(request, answer.reviewer, answer.decision, answer.expires)
        )
    except InvalidSignature:
        raise RefusedApprovalError(
            f"the signature is not {answer.reviewer!r}'s over this request ({request.describe()})"
        ) from None
    if (now or datetime.now(UTC)) >= until:
        raise RefusedApprovalError(f"{answer.reviewer!r}'s approval expired at {answer.expires}")
