"""The import graph of `sparse_lightning` and `datamodules`, read with `ast`: no cycles among module-level imports, and
no import of the package inside a function (the usual way a cycle gets hidden) except the lazy imports below."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sparse_lightning", "datamodules")
#: Optional extras, imported inside the function that needs them so the package imports without them.
OPTIONAL_EXTRAS = ("peft", "lm_eval", "gguf", "matplotlib", "bitsandbytes")
#: Function-local imports of the package itself that are allowed: (module, imported module) -> why. None today.
LOCAL_PACKAGE_IMPORTS: dict[tuple[str, str], str] = {}


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported(module: str, path: Path, node: ast.Import | ast.ImportFrom, files: dict[str, Path]) -> list[str]:
    """The package modules an import statement names (`from pkg import sub` names `pkg.sub` when that is a module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            package = package[:len(package) - node.level + 1]
            base = ".".join([*package, base] if base else package)
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
    found = []
    for name in names:
        while name and name not in files:
            name = name.rpartition(".")[0]
        if name:
            found.append(name)
    return found


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str]], list[tuple[str, int, str]]]:
    """(module -> package modules it imports at module level, function-local imports of the package, module-level
    imports of anything else) as (module, line, imported)."""
    files = module_files()
    graph: dict[str, set[str]] = {}
    local_package: list[tuple[str, int, str]] = []
    top_other: list[tuple[str, int, str]] = []
    for module, path in files.items():
        graph[module] = set()

        def visit(nodes, top: bool) -> None:
            for node in nodes:
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    targets = imported(module, path, node, files)
                    if top:
                        graph[module].update(targets)
                        if not targets:
                            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                            top_other.extend((module, node.lineno, name or "") for name in names)
                    else:
                        local_package.extend((module, node.lineno, target) for target in targets)
                elif top and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    continue  # never runs
                else:
                    inside = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                    visit(ast.iter_child_nodes(node), top and not inside)

        visit(ast.parse(path.read_text(encoding="utf-8")).body, True)
        graph[module].discard(module)
    return graph, local_package, top_other


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_graph_is_read():
    graph, _, _ = import_graph()
    assert "sparse_lightning.borders.export" in graph["sparse_lightning.export"]
    assert "datamodules.padding" in graph["datamodules.packing"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph, _, _ = import_graph()
    assert cycles(graph) == []


def test_the_package_is_not_imported_inside_functions():
    _, local_package, _ = import_graph()
    assert [entry for entry in local_package if entry[::2] not in LOCAL_PACKAGE_IMPORTS] == []


def test_optional_extras_are_imported_only_where_they_are_used():
    """The package imports without its extras: none of them is imported at module level."""
    _, _, top_other = import_graph()
    assert [entry for entry in top_other if entry[2].partition(".")[0] in OPTIONAL_EXTRAS] == []
