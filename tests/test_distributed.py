"""SIFT on 2 CPU ranks (gloo), under DDP and under FSDP2 (ModelParallelStrategy), against one process.

Invariant 6: the selection is identical on every rank. A 2-rank run with per-rank batch B trains exactly what a single
process trains with batch 2B on the same examples per step. Invariant 7 across ranks: resuming the 2-rank run from its
epoch-0 checkpoint reproduces it. Each multi-process run is a standalone script in a subprocess (Lightning relaunches
the script per rank); the single-process reference runs in this process.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from sparse_lightning.export import DELTA_WEIGHTS, export_checkpoint
from sparse_lightning.modules.fsdp2 import fully_shard_model

pytestmark = pytest.mark.multiprocess

SCRIPT = Path(__file__).resolve().parent / "distributed_scripts" / "sift_run.py"
RANKS = 2
BATCH = 4  # per rank; the single-process reference uses RANKS * BATCH
EPOCHS, STEPS_PER_EPOCH = 2, 2  # the script's max_epochs and limit_train_batches


def load_script():
    spec = importlib.util.spec_from_file_location("sift_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sift_run = load_script()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(strategy: str, model_dir: Path, output: Path, resume: Path | None = None,
           timeout: float = 300, method: str | None = None, script: Path = SCRIPT) -> list[dict]:
    """Run `script` on RANKS CPU processes (the whole process group is killed on timeout); per-rank results."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(script), "--model_dir", str(model_dir), "--output", str(output),
               "--strategy", strategy, "--devices", str(RANKS), "--batch_size", str(BATCH)]
    command += ["--method", method] if method else []
    command += ["--resume", str(resume)] if resume else []
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        pytest.fail(f"{strategy} run did not finish in {timeout} s:\n{out[-4000:]}")
    assert process.returncode == 0, f"{strategy} run failed:\n{out[-6000:]}"
    return [torch.load(output / f"rank{rank}.pt") for rank in range(RANKS)]


@pytest.fixture(scope="module")
def model_dir(tiny_bert_dir: Path, tmp_path_factory) -> Path:
    """Tiny BERT with its classifier saved too, so every run starts from the same head whatever the RNG did."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    path = tmp_path_factory.mktemp("tiny-bert-cls")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runs(model_dir: Path, tmp_path_factory):
    """Each strategy's 2-rank run, launched once per module whichever test asks first."""
    done: dict[str, tuple[str, list[dict], Path]] = {}

    def get(strategy: str) -> tuple[str, list[dict], Path]:
        if strategy not in done:
            output = tmp_path_factory.mktemp(strategy)
            ranks = launch(strategy, model_dir, output)
            assert [r["global_step"] for r in ranks] == [EPOCHS * STEPS_PER_EPOCH] * RANKS
            done[strategy] = strategy, ranks, output
        return done[strategy]

    return get


@pytest.fixture(params=["ddp", "fsdp2"])
def distributed(request, runs) -> tuple[str, list[dict], Path]:
    return runs(request.param)


def same_examples_per_step(ranks: list[dict], tmp_path: Path) -> Path:
    """The train file reordered so that single-process batch t (size RANKS * BATCH) holds exactly the examples
    of the ranks' batches t, whatever order the distributed sampler gave each rank."""
    lines = (sift_run.DATA / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    header, rows = lines[0], lines[1:]
    order = []
    for epoch in range(EPOCHS):
        orders = [r["orders"][epoch] for r in ranks]
        assert sorted(i for o in orders for i in o) == list(range(len(rows)))  # the ranks partition the data
        order += [i for t in range(STEPS_PER_EPOCH) for o in orders for i in o[t * BATCH:(t + 1) * BATCH]]
    path = tmp_path / "train.tsv"
    path.write_text(header + "".join(rows[i] for i in order), encoding="utf-8")
    return path


def test_selection_identical_on_every_rank(distributed) -> None:
    strategy, ranks, _ = distributed
    assert [r["world_size"] for r in ranks] == [RANKS] * RANKS
    first = ranks[0]["indices"]
    assert len(first) == 8  # q, k, v, attention.output.dense in 2 layers
    for other in ranks[1:]:
        assert first.keys() == other["indices"].keys()
        for name in first:
            assert torch.equal(first[name], other["indices"][name]), name
    for name, values in ranks[0]["values"].items():
        assert torch.equal(values, ranks[1]["values"][name]), name  # gathered training state agrees too


def test_trains_what_one_process_trains_with_the_global_batch(distributed, model_dir: Path, tmp_path: Path) -> None:
    strategy, ranks, _ = distributed
    if strategy == "fsdp2":
        assert ranks[0]["values_type"] == "DTensor"  # the deltas really were sharded
    train_file = same_examples_per_step(ranks, tmp_path)  # all steps of both epochs, in one epoch
    sift_run.run(str(model_dir), tmp_path / "single", batch_size=RANKS * BATCH, max_epochs=1,
                 limit_train_batches=None, train_file=train_file)
    single = torch.load(tmp_path / "single" / "rank0.pt")
    assert single["global_step"] == EPOCHS * STEPS_PER_EPOCH

    got = ranks[0]
    for name, indices in single["indices"].items():
        # scores all-reduced over ranks select what one process selects from the same calibration examples
        assert torch.equal(got["indices"][name], indices), name
        values = single["values"][name]
        assert values.abs().max() > 1e-3, "the deltas barely moved: the comparison would be vacuous"
        torch.testing.assert_close(got["values"][name], values, rtol=0, atol=1e-5, msg=name)
    for name, param in single["classifier"].items():
        torch.testing.assert_close(got["classifier"][name], param, rtol=0, atol=1e-5, msg=f"classifier.{name}")


def test_checkpoint_exports_the_full_delta(distributed, tmp_path: Path) -> None:
    """FSDP2 saves a full (gathered) checkpoint here; export reads it like a single-process one."""
    strategy, ranks, output = distributed
    written = export_checkpoint(output / "epoch=1.ckpt", tmp_path / "export")
    tensors = load_file(str(written["delta"] / DELTA_WEIGHTS))
    for name, indices in ranks[0]["indices"].items():
        assert torch.equal(tensors[f"{name}.indices"], indices), name
        assert torch.equal(tensors[f"{name}.values"], ranks[0]["values"][name]), name
    for name, param in ranks[0]["classifier"].items():
        assert torch.equal(tensors[f"classifier.{name}"], param), name


def test_fsdp2_resume_reproduces_the_uninterrupted_run(runs, model_dir: Path, tmp_path: Path) -> None:
    """Invariant 7 on the sharded path (the single-process path is tests/test_resume.py)."""
    strategy, ranks, output = runs("fsdp2")
    resumed = launch(strategy, model_dir, tmp_path, resume=output / "epoch=0.ckpt")
    for rank, result in enumerate(resumed):
        assert result["global_step"] == EPOCHS * STEPS_PER_EPOCH and list(result["orders"]) == [1]
        assert result["orders"][1] == ranks[rank]["orders"][1]  # the sampler's epoch came back too
        for name, indices in ranks[rank]["indices"].items():
            assert torch.equal(result["indices"][name], indices), name
            torch.testing.assert_close(result["values"][name], ranks[rank]["values"][name], rtol=0, atol=1e-7)
        for name, param in ranks[rank]["classifier"].items():
            torch.testing.assert_close(result["classifier"][name], param, rtol=0, atol=1e-7)


def test_shuffle_false_keeps_the_file_order_on_every_rank(distributed) -> None:
    strategy, ranks, _ = distributed
    for rank, result in enumerate(ranks):
        assert result["orders"][0] == list(range(rank, 64, RANKS))


class FakeMesh:
    """What fully_shard_model reads of a DeviceMesh: dim names and per-dim sub-meshes with a size."""

    def __init__(self, **sizes: int) -> None:
        self.sizes = sizes
        self.mesh_dim_names = tuple(sizes)

    def __getitem__(self, name: str) -> "FakeMesh":
        return FakeMesh(**{name: self.sizes[name]})

    def size(self) -> int:
        return next(iter(self.sizes.values()))


def test_fsdp2_refuses_a_tensor_parallel_mesh(tiny_bert_dir: Path) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    message = r"2 ranks on its tensor-parallel dim.*data_parallel_size=<number of devices>, tensor_parallel_size=1"
    with pytest.raises(ValueError, match=message):
        fully_shard_model(model, FakeMesh(data_parallel=1, tensor_parallel=2))
