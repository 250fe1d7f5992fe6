"""Count the hand-kept lists of methods outside `sparse_lightning/registry.py` (issue 27: at most 4 may remain).

A hand-kept list is a Python literal (list, tuple, set, dict keys; an element may be a tuple or a call whose first
item is the name) or a shell line naming three or more methods (the registry's names and the old `spiel`).

    python scripts/count_method_lists.py [ROOT]    # prints each list and the total
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparse_lightning.registry import METHODS, OLD_NAMES  # noqa: E402

NAMES = set(METHODS) | set(OLD_NAMES)
#: The registry and its own test.
REGISTRY = {Path("sparse_lightning") / "registry.py", Path("tests") / "test_registry.py"}
SKIP = {".venv", ".git", "node_modules", "__pycache__"}


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)) and node.elts:
        return _name(node.elts[0])
    if isinstance(node, ast.Call) and node.args:  # pytest.param("sift", ...)
        return _name(node.args[0])
    return None


def python_lists(source: str) -> list[tuple[int, list[str]]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        items = node.keys if isinstance(node, ast.Dict) else node.elts if isinstance(
            node, (ast.List, ast.Tuple, ast.Set)) else None
        named = sorted({_name(item) for item in items or [] if item is not None} & NAMES)
        if len(named) >= 3:
            found.append((node.lineno, named))
    return found


def shell_lists(source: str) -> list[tuple[int, list[str]]]:
    found = []
    for number, line in enumerate(source.splitlines(), 1):
        named = sorted(set(re.findall(r"[A-Za-z0-9_]+", line.partition("#")[0])) & NAMES)
        if len(named) >= 3:
            found.append((number, named))
    return found


def hand_kept_lists(root: Path = ROOT) -> list[str]:
    """`path:line: names` for every hand-kept list under `root`."""
    lists = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if SKIP & set(relative.parts) or relative in REGISTRY or path.suffix not in (".py", ".sh"):
            continue
        source = path.read_text(encoding="utf-8")
        found = python_lists(source) if path.suffix == ".py" else shell_lists(source)
        lists += [f"{relative}:{line}: {', '.join(named)}" for line, named in found]
    return lists


if __name__ == "__main__":
    found = hand_kept_lists(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT)
    print("\n".join(found))
    print(f"total: {len(found)}")
