"""The package is layered: its import graph has no cycle, and its imports are written at module top.

The graph is read from the source with ``ast`` (nothing is imported). Its nodes are the modules of
``lightning_mtp``; an edge ``a -> b`` is an import of ``b`` anywhere in ``a``: at module top or inside a function
or class. The rules that decide what counts:

- ``from lightning_mtp.x import y`` is an edge to ``lightning_mtp.x.y`` when ``y`` is a submodule, else to
  ``lightning_mtp.x``; relative imports are resolved against the importing module.
- The parent packages Python runs before a submodule (``lightning_mtp/__init__``, ``methods/__init__``) are not
  edges: every module would otherwise import the package root, which imports everything.
- Imports under ``if TYPE_CHECKING:`` are not edges: they are never executed (annotations only).

And the rule for imports inside functions: an import of a ``lightning_mtp`` module inside a function is refused
unless its line carries the marker comment ``# optional:`` saying which optional dependency it waits for. An
intra-package import never dodges a cycle: a module that needs another imports it at its top, and if that makes
a cycle, code moves to the layer where it belongs (see docs/architecture.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_mtp"
OPTIONAL_MARKER = "# optional:"


def _module_names() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _absolute(module: str | None, level: int, importer: str, is_package: bool) -> str:
    """The absolute name of ``from <level dots><module> import ...`` written in ``importer``."""
    if not level:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, *([module] if module else [])])


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """Ids of the import nodes under ``if TYPE_CHECKING:``."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skipped


def _in_function_nodes(tree: ast.AST) -> set[int]:
    """Ids of the nodes inside a function or method body."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(n) for stmt in ast.iter_child_nodes(node) for n in ast.walk(stmt))
    return inside


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: set[str]) -> list[str]:
    """The package modules one import statement reaches, by the rules in the module docstring."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in modules]
    base = _absolute(node.module, node.level, importer, is_package)
    found = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        found.append(sub if sub in modules else base)
    return [name for name in dict.fromkeys(found) if name in modules and name != importer]


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """``(edges, refused)``: the graph, and each function-level package import without the optional marker."""
    modules = _module_names()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    refused = []
    for name, path in modules.items():
        source = path.read_text()
        tree = ast.parse(source)
        skipped, inside = _type_checking_nodes(tree), _in_function_nodes(tree)
        lines = source.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in skipped:
                continue
            targets = _targets(node, name, path.name == "__init__.py", set(modules))
            edges[name].update(targets)
            if targets and id(node) in inside and OPTIONAL_MARKER not in lines[node.lineno - 1]:
                refused.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return edges, refused


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as ``[a, b, ..., a]``, or None (depth-first search, colouring nodes)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_the_graph_reads_every_module_and_its_edges():
    edges, _ = import_graph()
    assert "lightning_mtp.module" in edges and "lightning_mtp.decoding.speculative" in edges
    assert "lightning_mtp.backbone" in edges["lightning_mtp.decoding.speculative"]
    assert "lightning_mtp.module" in edges["lightning_mtp.cli"]


def test_the_cycle_finder_names_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph()[0])
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_package_imports_inside_functions_are_only_for_optional_dependencies():
    refused = import_graph()[1]
    assert not refused, (f"imports of lightning_mtp modules inside functions (move them to the module top, or mark "
                         f"an optional dependency with {OPTIONAL_MARKER!r}):\n" + "\n".join(refused))


def test_no_module_imports_a_private_name_of_another():
    modules = _module_names()
    private = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = _absolute(node.module, node.level, name, path.name == "__init__.py")
                if base.startswith("lightning_mtp"):
                    private += [f"{name}: {base}.{a.name}" for a in node.names
                                if a.name.startswith("_") and a.name != "__version__"]
    assert not private, "private names imported across modules:\n" + "\n".join(private)
