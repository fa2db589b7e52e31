"""The licence policy (scripts/check_licenses.py) on made-up pip-licenses rows, no install."""

from __future__ import annotations

import pytest

from scripts.check_licenses import REVIEWED, failures, verdict


@pytest.mark.parametrize(
    "licence",
    [
        "MIT License",
        "Apache-2.0",
        "BSD License; Apache Software License",
        "Mozilla Public License 2.0 (MPL 2.0)",
        "ISC",
        "Python Software Foundation License",
    ],
)
def test_passes_permissive_licences(licence: str) -> None:
    assert verdict("somepkg", licence) is None


@pytest.mark.parametrize(
    "licence",
    [
        "LGPL-3.0-or-later",
        "GNU Lesser General Public License v3 (LGPLv3)",
        "GNU Library or Lesser General Public License (LGPL)",
        "lgplv2+",
    ],
)
def test_passes_lgpl_as_a_dynamically_linked_library(licence: str) -> None:
    assert verdict("somepkg", licence) is None


@pytest.mark.parametrize(
    "licence",
    [
        "GPL-3.0",
        "GPLv2+",
        "GNU General Public License v3 (GPLv3)",
        "AGPL-3.0-only",
        "GNU Affero General Public License v3",
        "Server Side Public License (SSPL)",
        "EUPL 1.2",
        "gpl",
    ],
)
def test_fails_copyleft_licences_naming_the_licence(licence: str) -> None:
    assert verdict("somepkg", licence) == f"copyleft licence '{licence}'"


def test_fails_a_copyleft_licence_offered_next_to_a_permissive_or_lgpl_one() -> None:
    """An OR is a choice someone must make and record in REVIEWED, not the script."""
    assert verdict("somepkg", "MIT OR GPL-2.0") is not None
    assert verdict("somepkg", "LGPL-2.1; GPL-2.0") is not None


@pytest.mark.parametrize("licence", ["", "   ", "UNKNOWN", "unknown", " Unknown "])
def test_fails_packages_without_licence_metadata(licence: str) -> None:
    assert verdict("somepkg", licence) == "no licence metadata"


def test_a_reviewed_package_passes_whatever_its_metadata_says() -> None:
    assert "pygit2" in REVIEWED
    assert verdict("pygit2", "GPLv2 with linking exception") is None
    assert verdict("PyGit2", "UNKNOWN") is None  # names compare case-insensitively
    assert verdict("pygit2-fork", "GPLv2 with linking exception") is not None


def test_every_reviewed_package_records_why() -> None:
    assert all(name == name.lower() and why.strip() for name, why in REVIEWED.items())


def test_lists_only_the_failing_packages_with_version_and_reason() -> None:
    rows = [
        {"Name": "numpy", "Version": "2.1.0", "License": "BSD License"},
        {"Name": "badlib", "Version": "1.0", "License": "GPL-3.0"},
        {"Name": "mystery", "Version": "0.1", "License": "UNKNOWN"},
        {"Name": "dulwich", "Version": "0.22", "License": "Apache-2.0 OR GPL-2.0-or-later"},
        {"Name": "psycopg", "Version": "3.2", "License": "GNU Lesser General Public License v3"},
    ]
    assert failures(rows) == [
        "badlib 1.0: copyleft licence 'GPL-3.0'",
        "mystery 0.1: no licence metadata",
    ]
    assert failures([]) == []
