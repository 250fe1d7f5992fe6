"""Copy the quality tables (benchmarks/results/quality/glue.md, math.md) into the README's results section, between
its `<!-- NAME: ... -->` and `<!-- end NAME -->` markers, so the README shows exactly what the drivers measured.

Usage: .venv/bin/python benchmarks/readme_results.py      (run by benchmarks/quality_commit.sh)
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TABLES = REPO / "benchmarks" / "results" / "quality"


def tables_of(markdown: str) -> str:
    """From a results file's `Seed...` line (what was run, at what cost) to its last table row: not its title, prose
    or commands."""
    lines = markdown.splitlines()
    rows = [i for i, line in enumerate(lines) if line.startswith("|")]
    if not rows:
        return ""
    status = [i for i, line in enumerate(lines[:rows[0]]) if line.startswith("Seed")]
    return "\n".join(lines[(status or rows)[0]:rows[-1] + 1])


def splice(readme: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {re.escape(name)}: [^\n]*-->\n)(.*?)(<!-- end {re.escape(name)} -->)", re.S)
    if not pattern.search(readme):
        raise SystemExit(f"README.md has no <!-- {name}: ... --> / <!-- end {name} --> markers")
    return pattern.sub(lambda m: m.group(1) + (body + "\n" if body else "") + m.group(3), readme)


def main() -> None:
    readme_path = REPO / "README.md"
    readme = readme_path.read_text()
    for name in ("glue.md", "math.md"):
        source = TABLES / name
        readme = splice(readme, name, tables_of(source.read_text()) if source.exists() else "")
    readme_path.write_text(readme)
    print(f"wrote {readme_path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
