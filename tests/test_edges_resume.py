"""Issue 11, item 4 (invariant 7): kill -9 a run mid-epoch or at an epoch boundary, resume it with `ckpt_path`, and the
final state equals the uninterrupted run's bit for bit (fp32, CPU), for every method of the registry.

The training order is a function of (seed, epoch) and the loader's position travels with each checkpoint
(`datamodules/sampling.py`). The runs happen in one subprocess (tests/edges_scripts/kill_and_resume.py): its killed
children really die of SIGKILL right after a checkpoint is written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datamodules.glue import GLUEDataModule
from datamodules.sampling import ResumableSampler
from sparse_lightning.registry import names

SCRIPT = Path(__file__).resolve().parent / "edges_scripts" / "kill_and_resume.py"
DATA = Path(__file__).resolve().parent / "data" / "sst2_tiny"
#: Every method of the registry, SIFT with dropout on (the resumed run continues the random stream) and SIFT's global
#: allocation with dropout on (the resumed run also takes the checkpoint's per-weight sizes).
METHODS = [*names(), "sift_dropout", "sift_global"]


def glue(model_dir: Path, seed: int = 7) -> GLUEDataModule:
    datamodule = GLUEDataModule(task="sst2", tokenizer_name_or_path=str(model_dir), train_file=str(DATA / "train.tsv"),
                                validation_files=[str(DATA / "dev.tsv")], batch_size=16, max_length=32, seed=seed)
    datamodule.setup("fit")
    return datamodule


def epoch_order(datamodule: GLUEDataModule, epoch: int) -> list[list[int]]:
    loader = datamodule.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return [batch["input_ids"][:, 1].tolist() for batch in loader]


def test_the_order_is_a_function_of_seed_and_epoch(tiny_bert_dir: Path) -> None:
    first, rebuilt = glue(tiny_bert_dir), glue(tiny_bert_dir)
    assert epoch_order(first, 1) == epoch_order(rebuilt, 1)  # a loader built in a resumed process: same epoch-1 order
    assert epoch_order(first, 0) != epoch_order(first, 1)
    assert epoch_order(glue(tiny_bert_dir, seed=8), 1) != epoch_order(first, 1)


def test_a_loader_resumes_after_the_batches_it_handed_out(tiny_bert_dir: Path) -> None:
    datamodule = glue(tiny_bert_dir)
    loader = datamodule.train_dataloader()
    loader.sampler.set_epoch(1)
    batches = iter(loader)
    seen = [next(batches)["input_ids"] for _ in range(3)]
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 3, "batch_size": 16}
    rest = [batch["input_ids"] for batch in batches]

    resumed = glue(tiny_bert_dir).train_dataloader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    again = [batch["input_ids"] for batch in resumed]
    assert len(seen) + len(again) == len(loader) and all(torch.equal(a, b) for a, b in zip(again, rest))
    assert resumed.state_dict()["batches"] == len(loader)
    resumed.sampler.set_epoch(2)  # the next epoch starts from its beginning
    assert len(list(resumed)) == len(loader)


def test_ranks_split_the_same_order() -> None:
    data = list(range(10))
    ranks = [list(ResumableSampler(data, shuffle=True, seed=3, num_replicas=2, rank=r)) for r in range(2)]
    single = list(ResumableSampler(data, shuffle=True, seed=3))
    assert sorted(ranks[0] + ranks[1]) == sorted(single) and ranks[0] == single[0::2]


@pytest.fixture(scope="module")
def runs(tiny_bert_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kill")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(SCRIPT), str(out), str(tiny_bert_dir), *METHODS],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("point", ["mid", "boundary"])
def test_kill_and_resume_is_exact(runs: Path, method: str, point: str) -> None:
    status = json.loads((runs / "status.json").read_text())
    assert status[f"{method}/{point}"] == signal.SIGKILL  # the run really died of kill -9
    expected = torch.load(runs / method / "uninterrupted.pt", weights_only=True)
    got = torch.load(runs / method / f"resumed-{point}.pt", weights_only=True)
    assert got.keys() == expected.keys()
    differ = [name for name, tensor in expected.items() if not torch.equal(got[name], tensor)]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
