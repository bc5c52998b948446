"""The dependency rule of DESIGN.md, checked on the source: api -> retrieval <- indexer.

- `retrieval` imports neither `api` nor `indexer`; `api` and `indexer` do not import each other.
- No import circle between modules, counting imports inside functions and TYPE_CHECKING blocks
  (a lazy import still makes two modules depend on each other).
- No module imports a private name (`_x`) from another module.
- Every package says in its `__init__.py` what it is for.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("retrieval", "indexer", "api")
FORBIDDEN = {
    "retrieval": ("api", "indexer"),
    "api": ("indexer",),
    "indexer": ("api",),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> Iterator[tuple[str, list[str], int]]:
    """(module, names imported from it, line) for every import statement, at any depth."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base, [alias.name for alias in node.names], node.lineno


def _ours(name: str) -> str | None:
    """The project module an import refers to (a `from pkg import module` names the module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, names, _ in _imports(path):
            if target.split(".")[0] not in PACKAGES:
                continue
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            dependencies = submodules or [d for d in [_ours(target)] if d is not None]
            graph[name].update(d for d in dependencies if d != name)
    return graph


def test_the_dependency_rule_holds() -> None:
    broken = []
    for name, path in MODULES.items():
        top = name.split(".")[0]
        for target, _, line in _imports(path):
            if target.split(".")[0] in FORBIDDEN[top]:
                broken.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not broken, "\n".join(broken)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of the graph, or None (depth-first search, colouring nodes)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_cycle_check_can_fail() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_private_name_is_imported_from_another_module() -> None:
    leaks = [
        f"{path.relative_to(ROOT)}:{line} imports {', '.join(private)} from {target}"
        for path in MODULES.values()
        for target, names, line in _imports(path)
        if target.split(".")[0] in PACKAGES
        and (private := [n for n in names if n.startswith("_") and not n.startswith("__")])
    ]
    assert not leaks, "\n".join(leaks)


@pytest.mark.parametrize(
    "init",
    sorted(
        str(p.relative_to(ROOT))
        for package in (*PACKAGES, "migrations", "tests")
        for p in (ROOT / package).rglob("__init__.py")
    ),
)
def test_every_package_says_what_it_is_for(init: str) -> None:
    tree = ast.parse((ROOT / init).read_text(encoding="utf-8"))
    docstring = ast.get_docstring(tree)
    assert docstring, f"{init} has no opening docstring"
    assert "\n" not in docstring.strip(), f"{init}: the opening docstring is one line"


def test_the_command_line_imports_no_heavy_library_before_a_command_runs() -> None:
    # `clipsearch --help`, a usage error and every command's start stay instant: torch, FAISS,
    # SQLAlchemy and numpy are imported inside the commands that use them.
    import subprocess
    import sys

    heavy = ("torch", "faiss", "sqlalchemy", "numpy", "open_clip", "fastapi")
    code = (
        "import sys, indexer.cli.app; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
