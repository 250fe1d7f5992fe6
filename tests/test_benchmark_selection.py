"""benchmarks/quality_selection.py (issue 28's diagnosis of SIFT's selection) runs as its docstring says, on the tiny
BERT: the same config twice selects the same entries, and the budget shares it reports add up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tiny_sst2_runs import tiny_sst2_config

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def test_the_same_config_twice_overlaps_fully_and_the_shares_add_up(tiny_bert_cls_dir: Path, tmp_path: Path):
    sift = {"class_path": "sparse_lightning.callbacks.GradientTopKCallback",
            "init_args": {"density": 0.1, "target_modules": TARGETS, "calibration_batches": 2}}
    config = tiny_sst2_config(tmp_path, tiny_bert_cls_dir, {"callbacks": [sift]})
    out = tmp_path / "selection.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality_selection.py"), str(config), str(config),
                           "--density", "0.1", "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "mean overlap between seeds: per weight 1.000, global top-k 1.000" in done.stdout
    numbers = json.loads(out.read_text())[0]
    for shares in (numbers["share_per_weight"], numbers["share_global"], numbers["mass_share"]):
        assert abs(sum(shares.values()) - 1.0) < 1e-6
