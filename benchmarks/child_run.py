"""One benchmark run: the real CLI as a child process, claimed, one per core, resumable mid-run, measured.

A run directory holds `quality_config.yaml` (what runs), `train.log`, `metrics.csv` (CSVLogger) and, while it
trains, `ckpt/last.ckpt` (Lightning's own checkpoint every few optimizer steps) and `progress.json` (the code
commit and the CPU and wall time of every attempt so far, updated as it runs). Stopped at any point (kill -9, a
session's end), the next driver resumes it from `ckpt/last.ckpt` with `fit --ckpt_path`, which continues
bit-exactly (tests/test_edges_resume.py), when the code is the same commit; otherwise, or after a failed attempt,
it starts from scratch. `result.json` marks it done (the checkpoint is deleted then); `error.json` marks a failure.

Used by benchmarks/quality.py (GLUE) and benchmarks/quality_math.py (SmolLM2 math).
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / ".venv" / "bin" / "sparse-lightning"
_TRAINABLE = re.compile(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+)")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
POLL_SECONDS = 20


def child_env(snapshot: Path | None) -> dict[str, str]:
    """One thread per job; the pinned library first on the path."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if snapshot is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(snapshot), os.environ.get("PYTHONPATH")]))
    return env


def checkpoint_interval(target: int, max_steps: int, validation_steps: set[int]) -> int:
    """The first interval from `target` up whose checkpoints miss every validation step and the last step: a run
    killed inside a validation whose step was just checkpointed would resume past it and lose that point (Lightning
    counts a checkpointed step's validation as done)."""
    avoid = validation_steps | {max_steps}
    interval = target
    while any(step in avoid for step in range(interval, max_steps + 1, interval)):
        interval += 1
    return interval


def add_checkpointing(trainer: dict[str, Any], run_dir: Path, every: int) -> None:
    """Make a trainer config write `run_dir/ckpt/last.ckpt` every `every` optimizer steps (and nothing else)."""
    trainer["enable_checkpointing"] = True
    callback = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": os.path.relpath(run_dir / "ckpt", REPO), "save_top_k": 0, "save_last": True,
                              "every_n_train_steps": every}}
    trainer["callbacks"] = [*(trainer.get("callbacks") or []), callback]


def _progress(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "progress.json"
    return json.loads(path.read_text()) if path.exists() else None


def _write_progress(run_dir: Path, progress: dict[str, Any]) -> None:
    partial = run_dir / "progress.json.tmp"
    partial.write_text(json.dumps(progress, indent=1))
    partial.replace(run_dir / "progress.json")


def resume_point(run_dir: Path, commit: str) -> Path | None:
    """The checkpoint an interrupted attempt with this code left, its metrics kept aside as metrics.<n>.csv (the
    CSVLogger deletes metrics.csv when it starts); or None after clearing what any earlier attempt left."""
    checkpoint = run_dir / "ckpt" / "last.ckpt"
    progress = _progress(run_dir)
    if (checkpoint.exists() and progress and progress["code_commit"] == commit
            and not (run_dir / "error.json").exists() and (run_dir / "quality_config.yaml").exists()):
        if (run_dir / "metrics.csv").exists():
            (run_dir / "metrics.csv").rename(run_dir / f"metrics.{len(progress['attempts'])}.csv")
        return checkpoint
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run_dir / "ckpt", ignore_errors=True)
    for stale in ("metrics.csv", "hparams.yaml", "config.yaml", "error.json", "progress.json",
                  *(p.name for p in run_dir.glob("metrics.*.csv"))):
        (run_dir / stale).unlink(missing_ok=True)
    return None


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process (and its waited-for children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / _CLOCK_TICKS


def run_child(name: str, run_dir: Path, command: list[str], env: dict[str, str], lock_path: Path, commit: str,
              write_config: Callable[[], None]) -> dict[str, Any] | None:
    """Run (or resume) one training command under this run's claim and the core's lock; the attempts so far
    ({returncode, cpu_seconds, wall_seconds, max_rss_mib, attempts}), or None when another driver holds the run or
    it finished meanwhile. The child inherits both locks, so they stay held if the driver is killed while it runs;
    a signal to the driver stops the child too."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / ".claim").open("a+") as claim, lock_path.open("a+") as lock:
        try:  # a second driver (its own --lock: a second core) skips the runs this one has taken
            fcntl.flock(claim.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[quality] skip {name}: another driver is running it", flush=True)
            return None
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[quality] waiting for {lock_path} (another training job holds it)", flush=True)
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if (run_dir / "result.json").exists():
            return None
        checkpoint = resume_point(run_dir, commit)
        if checkpoint is None:
            write_config()
            progress = {"code_commit": commit, "attempts": []}
        else:
            progress = _progress(run_dir)
            command = [*command, "--ckpt_path", str(checkpoint)]
        attempt = {"resumed_from": None if checkpoint is None else os.path.relpath(checkpoint, REPO),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu_seconds": 0.0, "wall_seconds": 0.0}
        progress["attempts"].append(attempt)
        _write_progress(run_dir, progress)
        print(f"[quality] {'resume' if checkpoint else 'start'} {name} ({time.strftime('%H:%M:%S')})", flush=True)
        start = time.time()
        with (run_dir / "train.log").open("a" if checkpoint else "w") as log:
            child = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     pass_fds=(lock.fileno(), claim.fileno()))  # kept if the driver dies

            def forward(signum, _frame):  # stop the child with the driver
                child.send_signal(signum)
                raise KeyboardInterrupt

            old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
            try:
                while True:
                    pid, status, usage = os.wait4(child.pid, os.WNOHANG)
                    if pid:
                        break
                    attempt.update(cpu_seconds=round(_cpu_seconds(child.pid), 1),
                                   wall_seconds=round(time.time() - start, 1))
                    _write_progress(run_dir, progress)
                    time.sleep(POLL_SECONDS)
            except KeyboardInterrupt:
                child.wait()
                print(f"[quality] interrupted {name}; it resumes from its last checkpoint next time", flush=True)
                raise
            finally:
                for s, handler in old.items():
                    signal.signal(s, handler)
        attempt.update(cpu_seconds=round(usage.ru_utime + usage.ru_stime, 1), wall_seconds=round(time.time() - start, 1),
                       max_rss_mib=round(usage.ru_maxrss / 1024, 1))
        _write_progress(run_dir, progress)
        attempts = progress["attempts"]
        return {"returncode": os.waitstatus_to_exitcode(status), "attempts": len(attempts),
                "cpu_seconds": round(sum(a["cpu_seconds"] for a in attempts), 1),
                "wall_seconds": round(sum(a["wall_seconds"] for a in attempts), 1),
                "max_rss_mib": max(a.get("max_rss_mib", 0.0) for a in attempts)}


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(validations, train losses) from the CSVLogger's metrics, every attempt's file in order: a resumed attempt
    redoes the steps after its checkpoint, and its rows replace the interrupted attempt's."""
    validations: dict[int, dict[str, Any]] = {}
    train: dict[int, float] = {}
    earlier = sorted(run_dir.glob("metrics.*.csv"), key=lambda p: int(p.name.split(".")[1]))
    for path in [*earlier, run_dir / "metrics.csv"]:
        if not path.exists():
            continue
        with path.open() as handle:
            for row in csv.DictReader(handle):
                step = int(row["step"]) if row.get("step") else None
                vals = {k[len("val/"):]: float(v) for k, v in row.items() if k.startswith("val/") and v not in ("", None)}
                if vals and step is not None:
                    # Lightning's CSVLogger writes validation rows at global_step - 1: store optimizer steps taken.
                    validations.setdefault(step + 1, {"step": step + 1}).update(vals)
                if row.get("train/loss") and step is not None:
                    train[step] = float(row["train/loss"])
    return ([validations[step] for step in sorted(validations)],
            [{"step": step, "loss": train[step]} for step in sorted(train)])


def measured(run_dir: Path, outcome: dict[str, Any], command: list[str]) -> dict[str, Any]:
    """What a finished run left: trainable count (from its log), every validation, losses, CPU and wall time of all
    its attempts (steps redone after an interruption included)."""
    log_text = (run_dir / "train.log").read_text(errors="replace")
    match = _TRAINABLE.search(log_text)
    validations, train = read_metrics(run_dir)
    record = {
        "trainable_params": int(match.group(1).replace(",", "")) if match else None,
        "all_params": int(match.group(2).replace(",", "")) if match else None,
        "validations": validations,
        "final": validations[-1] if validations else {},
        "train_loss": train,
        **{k: outcome[k] for k in ("cpu_seconds", "wall_seconds", "max_rss_mib", "attempts")},
        "threads": 1, "returncode": outcome["returncode"],
        "command": "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 " + " ".join(
            shlex.quote(str(Path(c).relative_to(REPO)) if c.startswith(str(REPO)) else c) for c in command),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if outcome["returncode"] != 0 or not validations:
        record["log_tail"] = log_text[-3000:]
    return record


def save_record(run_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """result.json for a run that validated (its checkpoint is no longer needed), error.json for one that did not
    (it runs again from scratch next time)."""
    if "log_tail" in record:
        (run_dir / "error.json").write_text(json.dumps(record, indent=1))
        print(f"[quality] FAILED {record['name']} (rc {record['returncode']}); see {run_dir / 'train.log'}",
              flush=True)
        return record
    (run_dir / "result.json").write_text(json.dumps(record, indent=1))
    shutil.rmtree(run_dir / "ckpt", ignore_errors=True)
    final = ", ".join(f"{k}={v:.4f}" for k, v in record["final"].items() if k != "step")
    print(f"[quality] done {record['name']}: {final}; cpu {record['cpu_seconds']:.0f} s, "
          f"wall {record['wall_seconds']:.0f} s", flush=True)
    return record
