"""SpIEL on 2 CPU ranks (gloo) under DDP and FSDP2: after a full and a partial reselection both ranks hold the same
indices (invariant 6) and the run trains what one process trains on the same examples per step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_distributed import BATCH, EPOCHS, RANKS, STEPS_PER_EPOCH, launch, model_dir, same_examples_per_step, sift_run

pytestmark = pytest.mark.multiprocess
__all__ = ["model_dir"]  # the fixture, shared with the SIFT tests


@pytest.mark.parametrize("method", ["spiel_ag", "spiel_ma"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_ranks_agree_and_match_one_process(strategy: str, method: str, model_dir: Path, tmp_path: Path) -> None:
    ranks = launch(strategy, model_dir, tmp_path / strategy, method=method)
    assert [r["global_step"] for r in ranks] == [EPOCHS * STEPS_PER_EPOCH] * RANKS
    total_k = sum(indices.numel() for indices in ranks[0]["indices"].values())
    (first, second), _ = ranks[0]["reselections"], ranks[1]["reselections"]
    assert first == (1, total_k) and second[0] == 3 and 0 < second[1] < total_k  # a full and a partial reselection
    assert ranks[1]["reselections"] == ranks[0]["reselections"]
    if strategy == "fsdp2":
        assert ranks[0]["values_type"] == "DTensor"
    for name, indices in ranks[0]["indices"].items():
        assert torch.equal(ranks[1]["indices"][name], indices), name
        assert indices.unique().numel() == indices.numel()
        assert torch.equal(ranks[1]["values"][name], ranks[0]["values"][name]), name

    train_file = same_examples_per_step(ranks, tmp_path)
    sift_run.run(str(model_dir), tmp_path / "single", batch_size=RANKS * BATCH, max_epochs=1,
                 limit_train_batches=None, train_file=train_file, method=method)
    single = torch.load(tmp_path / "single" / "rank0.pt")
    moved = 0
    for name, indices in single["indices"].items():
        assert torch.equal(ranks[0]["indices"][name], indices), name
        torch.testing.assert_close(ranks[0]["values"][name], single["values"][name], rtol=0, atol=1e-5, msg=name)
        moved += single["values"][name].abs().max() > 1e-3
    assert moved, "the deltas barely moved: the comparison would be vacuous"
