"""S2FT on 2 CPU ranks (gloo), under DDP and FSDP2 (ModelParallelStrategy), against one process.

Invariant 6: the data-driven selection (activation norms summed over ranks) and so the co-permutation are
identical on every rank, and equal to what one process selects from the same calibration examples; a 2-rank run
with per-rank batch B trains what one process trains with batch 2B on the same examples per step.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparse_lightning.export import DELTA_WEIGHTS, export_checkpoint
from tests.test_distributed import BATCH, RANKS, launch as launch_script, model_dir

__all__ = ["model_dir"]  # the fixture, shared with the SIFT tests

pytestmark = pytest.mark.multiprocess

SCRIPT = Path(__file__).resolve().parent / "distributed_scripts" / "s2ft_run.py"


def load_script():
    spec = importlib.util.spec_from_file_location("s2ft_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


s2ft_run = load_script()


def launch(strategy: str, model_dir: Path, output: Path) -> list[dict]:
    return launch_script(strategy, model_dir, output, script=SCRIPT)


@pytest.fixture(scope="module", params=["ddp", "fsdp2"])
def distributed(request, model_dir: Path, tmp_path_factory) -> tuple[str, list[dict], Path]:
    output = tmp_path_factory.mktemp(request.param)
    return request.param, launch(request.param, model_dir, output), output


@pytest.fixture(scope="module")
def single(distributed, model_dir: Path, tmp_path_factory) -> dict:
    """One process, batch RANKS * BATCH, reading at step t exactly the examples the ranks read at step t."""
    strategy, ranks, _ = distributed
    lines = (s2ft_run.DATA / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    order = [i for t in range(s2ft_run.STEPS) for r in ranks for i in r["order"][t * BATCH:(t + 1) * BATCH]]
    output = tmp_path_factory.mktemp(f"single-{strategy}")
    train_file = tmp_path_factory.mktemp(f"data-{strategy}") / "train.tsv"
    train_file.write_text(lines[0] + "".join(lines[1 + i] for i in order), encoding="utf-8")
    s2ft_run.run(str(model_dir), output, batch_size=RANKS * BATCH, train_file=train_file)
    return torch.load(output / "rank0.pt")


def test_selection_identical_on_every_rank_and_to_one_process(distributed, single) -> None:
    strategy, ranks, _ = distributed
    assert [r["world_size"] for r in ranks] == [RANKS] * RANKS
    assert len(single["permutations"]) == 4 and len(single["positions"]) == 8
    for result in ranks:
        for key in ("permutations", "positions"):
            assert result[key].keys() == single[key].keys()
            for name, tensor in single[key].items():
                assert torch.equal(result[key][name], tensor), (strategy, key, name)


def test_trains_what_one_process_trains_with_the_global_batch(distributed, single) -> None:
    strategy, ranks, _ = distributed
    if strategy == "fsdp2":
        assert ranks[0]["block_type"] == "DTensor"  # the blocks really were sharded
    assert ranks[0]["global_step"] == single["global_step"] == s2ft_run.STEPS
    for name, block in single["blocks"].items():
        assert block.abs().max() > 1e-3, "the blocks barely moved: the comparison would be vacuous"
        for result in ranks:
            torch.testing.assert_close(result["blocks"][name], block, rtol=0, atol=1e-5, msg=name)
    for name, param in single["classifier"].items():
        torch.testing.assert_close(ranks[0]["classifier"][name], param, rtol=0, atol=1e-5, msg=name)


def test_checkpoint_exports_the_unpermuted_blocks(distributed, tmp_path: Path) -> None:
    strategy, ranks, output = distributed
    written = export_checkpoint(output / "last.ckpt", tmp_path / "export")
    tensors = load_file(str(written["delta"] / DELTA_WEIGHTS))
    for name, positions in ranks[0]["positions"].items():
        kind = "columns" if name.endswith(("attention.output.dense", ".output.dense")) else "rows"
        assert torch.equal(tensors[f"{name}.{kind}"], positions), name
        assert torch.equal(tensors[f"{name}.block"], ranks[0]["blocks"][name]), name
