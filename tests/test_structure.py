"""The shape of the house, checked: no import cycle, App only at the face, no reaching in.

Read from the source with ``ast`` (nothing is imported), so a new module is
checked the moment it exists:

- the modules of ``taskq`` import each other without a cycle (type-only
  imports under ``if TYPE_CHECKING:`` count too: a cycle there is a tangle
  all the same);
- only the public face imports ``taskq._app``: ``taskq/__init__.py``,
  ``taskq/cli/``, ``taskq/contrib/`` and ``taskq/dashboard/``;
- no module uses another module's ``_private`` names: neither imports them,
  nor reads them off an imported module, nor calls a private method or
  attribute that only another module's classes define (``app._acquire``);
  modules of one package may share theirs;
- no file is over 600 lines.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import ROOT

PACKAGE = ROOT / "taskq"
MAX_LINES = 600
# Where `taskq._app` may be imported: the public face and what builds on it.
APP_IMPORTERS = ("taskq", "taskq.cli", "taskq.contrib", "taskq.dashboard")


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    is_package: bool
    imports: dict[str, int] = field(default_factory=dict)  # module -> first line
    private_from: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def package(self) -> str:
        return self.name if self.is_package else self.name.rpartition(".")[0]


def module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def load_modules() -> dict[str, Module]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name, is_package = module_name(path)
        tree = ast.parse(path.read_text(), str(path))
        modules[name] = Module(name, path, tree, is_package)
    for module in modules.values():
        collect_imports(module, modules)
    return modules


def resolve(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.package.split(".")
    if node.level > 1:
        base = base[: -(node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def collect_imports(module: Module, modules: dict[str, Module]) -> None:
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "taskq":
                    module.imports.setdefault(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            source = resolve(module, node)
            if source.split(".")[0] != "taskq":
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:  # `from . import _store`: the module itself
                    module.imports.setdefault(submodule, node.lineno)
                    continue
                module.imports.setdefault(source, node.lineno)
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    module.private_from.append((source, alias.name, node.lineno))


def same_package(a: str, b: str, modules: dict[str, Module]) -> bool:
    """Whether two modules are in one package below ``taskq`` (they may share privates)."""
    pa, pb = modules[a].package, modules[b].package if b in modules else b
    return pa == pb and pa != "taskq"


def cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph = {
        name: [d for d in m.imports if d in modules and d != name] for name, m in modules.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


MODULES = load_modules()


def test_there_is_something_to_check() -> None:
    assert {"taskq", "taskq._app", "taskq._database", "taskq._store"} <= set(MODULES)
    assert MODULES["taskq._app"].imports  # imports are seen


def test_no_import_cycle_among_taskq_modules() -> None:
    assert cycles(MODULES) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    a = Module("taskq.a", Path("a.py"), ast.parse(""), False, {"taskq.b": 1})
    b = Module("taskq.b", Path("b.py"), ast.parse(""), False, {"taskq.c": 1})
    c = Module("taskq.c", Path("c.py"), ast.parse(""), False, {"taskq.a": 1})
    assert cycles({"taskq.a": a, "taskq.b": b, "taskq.c": c}) == [["taskq.a", "taskq.b", "taskq.c"]]


def test_only_the_public_face_imports_app() -> None:
    offenders = [
        f"{m.path.relative_to(ROOT)}:{m.imports['taskq._app']}"
        for m in MODULES.values()
        if "taskq._app" in m.imports
        and not any(m.name == a or m.name.startswith(f"{a}.") for a in APP_IMPORTERS[1:])
        and m.name != "taskq"
    ]
    assert offenders == []


def test_no_private_name_is_imported_from_another_module() -> None:
    offenders = [
        f"{m.path.relative_to(ROOT)}:{line}: {name} from {source}"
        for m in MODULES.values()
        for source, name, line in m.private_from
        if not same_package(m.name, source, MODULES)
    ]
    assert offenders == []


def private_definitions(module: Module) -> set[str]:
    """Private names a module defines: functions, classes, attributes it assigns."""
    names: set[str] = set()
    for node in ast.walk(module.tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def foreign_private_uses(
    module: Module, modules: dict[str, Module], defined: dict[str, set[str]] | None = None
) -> Iterator[str]:
    """``x._name`` where ``_name`` is defined only by other modules (not this package's).

    ``defined``: each module's private definitions, when the caller has them
    (walking every module's tree once per module would be quadratic).
    """
    if defined is None:
        defined = {name: private_definitions(m) for name, m in modules.items()}
    own = set(defined[module.name])
    for other in modules.values():
        if other.name != module.name and same_package(module.name, other.name, modules):
            own |= defined[other.name]
    foreign: set[str] = set()
    for other in modules.values():
        if other.name != module.name:
            foreign |= defined[other.name]
    for node in ast.walk(module.tree):
        if not isinstance(node, ast.Attribute):
            continue
        name = node.attr
        if not name.startswith("_") or name.startswith("__") or name in own:
            continue
        base = node.value
        if isinstance(base, ast.Name) and base.id in ("self", "cls"):
            continue
        if name in foreign:
            yield f"{module.path.relative_to(ROOT)}:{node.lineno}: .{name}"


def test_no_module_reaches_into_another_modules_private_parts() -> None:
    defined = {name: private_definitions(m) for name, m in MODULES.items()}
    offenders = [use for m in MODULES.values() for use in foreign_private_uses(m, MODULES, defined)]
    assert offenders == []


def test_the_private_use_finder_sees_a_reach_into_the_app() -> None:
    reach = ast.parse("async def f(app):\n    async with app._acquire('x') as conn: ...\n")
    app = ast.parse("class App:\n    def _acquire(self): ...\n")
    modules = {
        "taskq.x": Module("taskq.x", ROOT / "taskq" / "x.py", reach, False),
        "taskq._app": Module("taskq._app", ROOT / "taskq" / "_app.py", app, False),
    }
    assert list(foreign_private_uses(modules["taskq.x"], modules)) == ["taskq/x.py:2: ._acquire"]


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_no_file_is_over_600_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines"
