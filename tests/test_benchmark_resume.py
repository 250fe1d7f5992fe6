"""benchmarks/child_run.py, the quality benchmarks' resumable runs: a run stopped mid-way resumes from its checkpoint
only with the code it started with and after no failure, keeps the interrupted attempt's metrics, and never puts a
resume checkpoint on a validation step (Lightning would count that validation as done and skip it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from script_loading import load_script

child_run = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "child_run.py")


def interrupted_run(tmp_path: Path, commit: str = "abc") -> Path:
    """What a run killed after its step-41 checkpoint leaves: config, checkpoint, progress, a partial metrics.csv."""
    run_dir = tmp_path / "run"
    (run_dir / "ckpt").mkdir(parents=True)
    (run_dir / "ckpt" / "last.ckpt").write_bytes(b"checkpoint")
    (run_dir / "quality_config.yaml").write_text("trainer: {}\n")
    (run_dir / "progress.json").write_text(json.dumps({"code_commit": commit, "attempts": [{"cpu_seconds": 5.0}]}))
    (run_dir / "metrics.csv").write_text("epoch,step,train/loss,val/accuracy\n0,39,0.9,\n0,49,0.8,\n")
    return run_dir


@pytest.mark.parametrize(("target", "max_steps", "validations", "expected"), [
    (40, 300, {100, 200, 300}, 41),   # 40 would checkpoint step 200, a validation step
    (25, 200, {200}, 26),             # the last step is never a checkpoint either
    (30, 200, {200}, 30),
])
def test_checkpoints_miss_every_validation_step(target: int, max_steps: int, validations: set[int],
                                                 expected: int) -> None:
    interval = child_run.checkpoint_interval(target, max_steps, validations)
    assert interval == expected
    assert not set(range(interval, max_steps + 1, interval)) & (validations | {max_steps})


def test_an_interrupted_run_resumes_with_its_code_and_keeps_its_metrics(tmp_path: Path) -> None:
    run_dir = interrupted_run(tmp_path)
    assert child_run.resume_point(run_dir, "abc") == run_dir / "ckpt" / "last.ckpt"
    assert not (run_dir / "metrics.csv").exists()  # the resumed CSVLogger would delete it
    (run_dir / "metrics.csv").write_text("epoch,step,train/loss,val/accuracy\n0,49,0.7,\n0,99,0.5,\n0,99,,0.8\n")
    validations, train = child_run.read_metrics(run_dir)
    assert train == [{"step": 39, "loss": 0.9}, {"step": 49, "loss": 0.7}, {"step": 99, "loss": 0.5}]
    assert validations == [{"step": 100, "accuracy": 0.8}]


@pytest.mark.parametrize("why", ["other code", "failed attempt", "no checkpoint"])
def test_a_run_restarts_from_scratch_when_its_checkpoint_cannot_be_trusted(tmp_path: Path, why: str) -> None:
    run_dir = interrupted_run(tmp_path)
    commit = "def" if why == "other code" else "abc"
    if why == "failed attempt":
        (run_dir / "error.json").write_text("{}")
    if why == "no checkpoint":
        (run_dir / "ckpt" / "last.ckpt").unlink()
    assert child_run.resume_point(run_dir, commit) is None
    assert sorted(p.name for p in run_dir.iterdir()) == ["quality_config.yaml"]  # rewritten before the child starts
