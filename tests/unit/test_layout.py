"""The layout holds: the store's private names stay inside it, models/ stays ML.

Read from the source with `ast`, so a forbidden import fails here before it ships.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
STORE = "common.store"
SKIP = {".venv", ".tools", ".git", "build", "node_modules"}

FORBIDDEN_IN_MODELS = {"psycopg", "boto3", "mlflow", "subprocess", "httpx"}
"""models/ is plain Python over frames and arrays: no database, S3, registry, processes, HTTP."""

ALLOWED_IN_MODELS: dict[str, set[str]] = {
    # The steps that log runs and models to MLflow, or load a model logged there.
    "models/evaluate.py": {"mlflow"},
    "models/predict.py": {"mlflow"},
    "models/promote.py": {"mlflow"},
    "models/register.py": {"mlflow"},
    "models/train.py": {"mlflow"},
}
"""Exactly the imports models/ has; models/export.py imports none of them."""


def python_files() -> Iterator[Path]:
    for path in sorted(ROOT.rglob("*.py")):
        if not SKIP.intersection(path.relative_to(ROOT).parts):
            yield path


def module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _in_store(module: str) -> bool:
    return module == STORE or module.startswith(f"{STORE}.")


def _private_module(module: str) -> bool:
    return any(is_private(part) for part in module.split("."))


def _from_store(node: ast.ImportFrom, found: list[str], modules: set[str]) -> None:
    """`from common.store[.x] import ...`: private names taken, module names bound."""
    module = node.module or ""
    if node.level != 0 or not _in_store(module):
        return
    if _private_module(module):
        found.append(f"line {node.lineno}: from {module} import ...")
    for alias in node.names:
        if is_private(alias.name):
            found.append(f"line {node.lineno}: from {module} import {alias.name}")
        elif alias.name[:1].islower():  # maybe a module: store.monitoring._x
            modules.add(alias.asname or alias.name)


def _import_store(node: ast.Import, found: list[str], modules: set[str]) -> None:
    """`import common.store[.x] [as y]`: a private module, and the name it binds."""
    for alias in node.names:
        if not _in_store(alias.name):
            continue
        if _private_module(alias.name):
            found.append(f"line {node.lineno}: import {alias.name}")
        modules.add(alias.asname or alias.name)


def store_private_uses(tree: ast.Module) -> list[str]:
    """`from common.store[.x] import _y`, `import common.store._x`, and `<store module>._y`."""
    found: list[str] = []
    modules: set[str] = set()  # local names bound to common.store or one of its modules
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            _from_store(node, found, modules)
        elif isinstance(node, ast.Import):
            _import_store(node, found, modules)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and is_private(node.attr)
            and ast.unparse(node.value) in modules
        ):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return sorted(found, key=lambda text: int(text.split()[1].rstrip(":")))


def imported_roots(tree: ast.Module) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_nothing_outside_the_store_uses_its_private_names() -> None:
    offences = {
        str(path.relative_to(ROOT)): uses
        for path in python_files()
        if not module_of(path).startswith(STORE)
        and (uses := store_private_uses(ast.parse(path.read_text(), str(path))))
    }
    assert offences == {}, "use the public API of common.store (its __all__)"


def test_the_checker_sees_private_store_imports() -> None:
    source = (
        "from common.store.rows import _dumps\n"
        "from common.store import monitoring\n"
        "monitoring._select(1)\n"
        "import common.store.log as plog\n"
        "plog._Segment\n"
        "from common.store import connect, dumps\n"
    )
    assert store_private_uses(ast.parse(source)) == [
        "line 1: from common.store.rows import _dumps",
        "line 3: monitoring._select",
        "line 5: plog._Segment",
    ]


def test_models_import_no_database_s3_process_or_http_client() -> None:
    offences = {}
    for path in sorted((ROOT / "models").rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        extra = (
            imported_roots(ast.parse(path.read_text(), name)) & FORBIDDEN_IN_MODELS
        ) - ALLOWED_IN_MODELS.get(name, set())
        if extra:
            offences[name] = sorted(extra)
    assert offences == {}, "models/ holds ML only: move I/O to common/ (e.g. common.store)"
