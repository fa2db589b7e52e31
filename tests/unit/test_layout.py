"""The layout holds: the store's private names stay inside it, models/ stays ML.

Read from the source with `ast`, so a forbidden import fails here before it ships.
"""

from __future__ import annotations

import ast
import sys
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


# -- each Prefect task calls one function ------------------------------------------------

TASK_ACCESSORS = {
    "common.settings.get_settings",
    "common.params.load_params",
    "common.registry.connect",
    "common.registry.served.cache_dir",
    "common.registry.model_name",
    "common.paths.layout",
    "prefect.get_run_logger",
}
"""What a task may call besides its one function: the settings, the params, the registry
client, the model cache folder, a tenant's model name and file layout, and its logger are
its inputs, not steps (so are Prefect's runtime context, the standard library and
constructors)."""

TASK_EXCEPTIONS: set[str] = set()
"""Tasks that still make more than one call, each with its reason."""


def _dotted(node: ast.expr) -> list[str] | None:
    """`a.b.c` as ["a", "b", "c"]; None for anything else (a call's result, a subscript)."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.insert(0, node.attr)
        node = node.value
    return [node.id, *parts] if isinstance(node, ast.Name) else None


class _TaskCalls:
    """Counts the calls a flows/ module's tasks make into the project and other libraries."""

    def __init__(self, tree: ast.Module) -> None:
        self.imports: dict[str, str] = {}
        for node in tree.body:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    local = alias.asname or alias.name.split(".")[0]
                    self.imports[local] = alias.name if alias.asname else local
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    self.imports[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
        self.tasks = {f.name: f for f in functions if self._is_task(f)}
        self.helpers = {f.name: f for f in functions if not f.decorator_list}

    def _qualified(self, node: ast.expr) -> str | None:
        parts = _dotted(node)
        if parts is None or parts[0] not in self.imports:
            return None
        return ".".join([self.imports[parts[0]], *parts[1:]])

    def _is_task(self, f: ast.FunctionDef) -> bool:
        for d in f.decorator_list:
            if self._qualified(d.func if isinstance(d, ast.Call) else d) == "prefect.task":
                return True
        return False

    def _counts(self, name: str) -> bool:
        root, last = name.split(".", maxsplit=1)[0], name.rsplit(".", 1)[-1]
        return not (
            name in TASK_ACCESSORS
            or name.startswith("prefect.runtime.")
            or root in sys.stdlib_module_names
            or last[:1].isupper()  # a constructor: builds an argument, does no step
        )

    def calls(self, node: ast.AST, seen: frozenset[str] = frozenset()) -> int:
        """Calls under `node` on the path that makes the most (if/else: one side)."""
        if isinstance(node, ast.IfExp):
            return self.calls(node.test, seen) + max(
                self.calls(node.body, seen), self.calls(node.orelse, seen)
            )
        own = 0
        if isinstance(node, ast.Call):
            parts = _dotted(node.func)
            helper = parts[0] if parts and len(parts) == 1 else None
            if helper in self.tasks:
                own = 1
            elif helper in self.helpers and helper not in seen:
                own = self.block(self.helpers[helper].body, seen | {helper})
            elif (name := self._qualified(node.func)) is not None and self._counts(name):
                own = 1
        return own + sum(self.calls(child, seen) for child in ast.iter_child_nodes(node))

    def block(self, body: list[ast.stmt], seen: frozenset[str] = frozenset()) -> int:
        """The calls of a statement list on its busiest path (an `if` forks the rest)."""
        total = 0
        for i, stmt in enumerate(body):
            if isinstance(stmt, ast.If):
                rest = body[i + 1 :]
                branches = (
                    self.block(stmt.body + rest, seen),
                    self.block(stmt.orelse + rest, seen),
                )
                return total + self.calls(stmt.test, seen) + max(branches)
            total += self.calls(stmt, seen)
            if isinstance(stmt, ast.Return | ast.Raise):
                break
        return total


def task_calls(tree: ast.Module) -> dict[str, int]:
    """Each task's calls on its busiest path (see _TaskCalls)."""
    counter = _TaskCalls(tree)
    return {name: counter.block(f.body) for name, f in counter.tasks.items()}


def test_each_flow_task_calls_one_function() -> None:
    found = {
        f"flows/{path.name}:{name}": n
        for path in sorted((ROOT / "flows").glob("*.py"))
        for name, n in task_calls(ast.parse(path.read_text(), str(path))).items()
    }
    assert len(found) >= 15, "the checker no longer finds the flows' tasks"
    offences = {task: n for task, n in found.items() if n > 1}
    assert offences.keys() - TASK_EXCEPTIONS == set(), (
        "a task calls one function of models/ or common/ (flows/README.md); "
        "put the steps in one function there"
    )
    assert TASK_EXCEPTIONS - offences.keys() == set(), "an exception is no longer needed"


def test_the_task_checker_counts_steps_not_inputs_and_one_side_of_an_if() -> None:
    source = (
        "import dataclasses\n"
        "from pathlib import Path\n"
        "from prefect import get_run_logger, task\n"
        "from common import registry\n"
        "from common.settings import get_settings\n"
        "from models import promote as policy\n"
        "def _helper(c):\n"
        "    return policy.judge(c)\n"
        "@task\n"
        "def thin(version):\n"
        "    client = registry.connect(get_settings())\n"
        "    get_run_logger().info('deciding %s', Path(version))\n"
        "    if version:\n"
        "        return policy.promote(client)\n"
        "    return dataclasses.replace(policy.reject(client))\n"
        "@task(retries=2)\n"
        "def thick(x):\n"
        "    c = policy.candidates(x)\n"
        "    return c, _helper(c)\n"
        "@task\n"
        "def branchy(x):\n"
        "    return policy.a(x) if x else policy.b(policy.c(x))\n"
    )
    assert task_calls(ast.parse(source)) == {"thin": 1, "thick": 2, "branchy": 2}
