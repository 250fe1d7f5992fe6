#!/usr/bin/env bash
# Rewrite the quality tables (and their copies in docs/results.md and the README) and commit them with every
# finished run's result.json, config, progress and metrics (metrics.<n>.csv: a resumed run's earlier attempts). Only
# these paths: runs/ is git-ignored, so the run files are added with -f.
# Usage: bash benchmarks/quality_commit.sh "commit message"
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python benchmarks/quality.py table
.venv/bin/python benchmarks/quality_math.py table
.venv/bin/python benchmarks/readme_results.py
paths=(README.md docs/results.md benchmarks/quality.py benchmarks/quality_math.py benchmarks/readme_results.py benchmarks/quality_commit.sh
       benchmarks/child_run.py
       benchmarks/results/quality/README.md
       benchmarks/results/quality/quality.json)
[ -e benchmarks/results/quality/math.json ] && paths+=(benchmarks/results/quality/math.json)
for md in benchmarks/results/quality/*.md; do paths+=("$md"); done
for result in benchmarks/results/quality/runs/*/result.json benchmarks/results/quality/math_runs/*/result.json; do
  [ -e "$result" ] || continue
  dir=$(dirname "$result")
  for f in result.json quality_config.yaml metrics.csv progress.json "$dir"/metrics.*.csv; do
    f=${f#"$dir/"}; [ -e "$dir/$f" ] && paths+=("$dir/$f")
  done
done
git add -f -- "${paths[@]}"
git commit -q -m "${1:-quality benchmark: tables and finished runs}" -- "${paths[@]}" && git log --oneline -1 | cat
