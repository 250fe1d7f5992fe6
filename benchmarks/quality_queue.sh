#!/usr/bin/env bash
# The GLUE table with the chosen defaults (plan "glue": seed 42 on all five tasks, then 43, then 44), one training
# job at a time. Resumable: finished runs (result.json) are skipped. If a driver is already running, pass its pid to
# wait for it first:  nohup bash benchmarks/quality_queue.sh [PID] >> benchmarks/results/quality/queue.log 2>&1 &
set -u
cd "$(dirname "$0")/.."
if [ -n "${1:-}" ]; then while kill -0 "$1" 2>/dev/null; do sleep 30; done; fi
.venv/bin/python benchmarks/quality.py run --plan glue
