#!/usr/bin/env bash
# The MRPC queue, one training job at a time: the follow-up diagnostics (where the budget goes), then
# the rest of the tuning sweep. Resumable: finished runs (result.json) are skipped. If a sweep driver is already running, pass its
# pid to wait for it first:  nohup bash benchmarks/quality_queue.sh [PID] >> benchmarks/results/quality/queue.log 2>&1 &
set -u
cd "$(dirname "$0")/.."
if [ -n "${1:-}" ]; then while kill -0 "$1" 2>/dev/null; do sleep 30; done; fi
.venv/bin/python benchmarks/quality.py run --plan mrpc-followup
.venv/bin/python benchmarks/quality.py run --plan mrpc-sweep
