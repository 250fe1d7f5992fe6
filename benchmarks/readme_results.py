"""Copy the quality tables (benchmarks/results/quality/glue.md, glue_per_task_schedule.md, math.md) into
docs/results.md, and the headline columns of GLUE on the per-task schedule (the current defaults) into the README,
between their `<!-- NAME: ... -->` and `<!-- end NAME -->` markers, so both show exactly what the drivers measured.

Usage: .venv/bin/python benchmarks/readme_results.py      (run by benchmarks/quality_commit.sh)
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TABLES = REPO / "benchmarks" / "results" / "quality"
RESULTS_PAGE = REPO / "docs" / "results.md"
README = REPO / "README.md"
# The README's short GLUE table keeps these columns of glue_per_task_schedule.md's first table (the first header
# starting with each name).
HEADLINE = "glue_per_task_schedule.md"
HEADLINE_COLUMNS = ("method", "trainable", "mean", "vs LoRA", "vs LoRA's best")


def tables_of(markdown: str) -> str:
    """From a results file's `Seed...` line (what was run, at what cost) to its last table row: not its title, prose
    or commands."""
    lines = markdown.splitlines()
    rows = [i for i, line in enumerate(lines) if line.startswith("|")]
    if not rows:
        return ""
    status = [i for i, line in enumerate(lines[:rows[0]]) if line.startswith("Seed")]
    return "\n".join(lines[(status or rows)[0]:rows[-1] + 1])


def cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def headline_of(markdown: str) -> str:
    """The first table of a results file, cut to HEADLINE_COLUMNS (those it has), for the README; a row without a mean
    (a method still missing tasks) stays in docs/results.md only."""
    lines = markdown.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if start is None:
        return ""
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    header = cells(lines[start])
    keep = [next(i for i, name in enumerate(header) if name.startswith(column))
            for column in HEADLINE_COLUMNS if any(name.startswith(column) for name in header)]
    kept = [[cells(line)[i] for i in keep] for line in lines[start:end]]
    kept[0] = [name.split(" (")[0] for name in kept[0]]  # "mean (sst2, mrpc, ...)" -> "mean": the prose names them
    if "mean" in kept[0]:
        mean = kept[0].index("mean")
        kept = kept[:2] + [row for row in kept[2:] if row[mean] not in ("", "-")]
    return "\n".join("| " + " | ".join(row) + " |" for row in kept)


def splice(text: str, name: str, body: str, where: Path) -> str:
    pattern = re.compile(rf"(<!-- {re.escape(name)}: [^\n]*-->\n)(.*?)(<!-- end {re.escape(name)} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{where.relative_to(REPO)} has no <!-- {name}: ... --> / <!-- end {name} --> markers")
    return pattern.sub(lambda m: m.group(1) + (body + "\n" if body else "") + m.group(3), text)


def write_spliced(path: Path, bodies: dict[str, str]) -> None:
    text = path.read_text(encoding="utf-8")
    for name, body in bodies.items():
        text = splice(text, name, body, path)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path.relative_to(REPO)}")


def main() -> None:
    sources = {name: (TABLES / name).read_text() if (TABLES / name).exists() else ""
               for name in ("glue.md", "glue_per_task_schedule.md", "math.md")}
    write_spliced(RESULTS_PAGE, {name: tables_of(text) for name, text in sources.items()})
    write_spliced(README, {"glue-headline": headline_of(sources[HEADLINE])})


if __name__ == "__main__":
    main()
