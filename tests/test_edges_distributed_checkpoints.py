"""An FSDP2 (DCP) checkpoint directory is read without running code: torch unpickles its `.metadata` with plain
`pickle.load` and its non-tensor items with `torch.load(weights_only=False)`, so the library checks both (and
Lightning's `meta.pt`) before anything loads (`borders/checkpoint_file.read_distributed_metadata`)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from sparse_lightning.borders.checkpoint_file import CheckpointError, read_distributed_metadata
from sparse_lightning.modules.sharded_checkpoint import saved_tensor_names


class Touches:
    """Unpickling it creates `marker`: what a crafted checkpoint would do with a worse callable."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def saved(tmp_path: Path, extra: dict | None = None) -> Path:
    """A distributed checkpoint as Lightning's FSDP2 writes one: model tensors, a plain optimizer item, meta.pt."""
    directory = tmp_path / "last.ckpt"
    dcp.save({"state_dict.model.delta_values": torch.randn(4), "optimizer_0": {"param_groups": [{"lr": 0.1}]},
              **(extra or {})}, checkpoint_id=str(directory), no_dist=True)
    torch.save({"global_step": 3}, directory / "meta.pt")
    return directory


def test_a_genuine_distributed_checkpoint_is_read(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    assert "state_dict.model.delta_values" in read_distributed_metadata(directory).state_dict_metadata
    assert saved_tensor_names(directory) == {"model.delta_values"}


def test_metadata_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    metadata = read_distributed_metadata(directory)
    metadata.planner_data = Touches(tmp_path / "ran")
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"\.metadata: refused: loading it would run code \(it asks for "
                                              r"pathlib\.Path\.touch\)"):
        saved_tensor_names(directory)
    assert not (tmp_path / "ran").exists()


def test_a_non_tensor_item_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    directory = saved(tmp_path, {"optimizer_1": Touches(tmp_path / "ran")})
    assert (tmp_path / "ran").exists() is False
    with pytest.raises(CheckpointError, match=r"item optimizer_1: refused: loading it would run code"):
        read_distributed_metadata(directory)
    assert not (tmp_path / "ran").exists()


def test_a_meta_file_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    torch.save({"global_step": Touches(tmp_path / "ran")}, directory / "meta.pt")
    with pytest.raises(CheckpointError, match=r"meta\.pt: refused: loading it would run code"):
        read_distributed_metadata(directory)
    assert not (tmp_path / "ran").exists()


def test_unreadable_metadata_is_one_line(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    (directory / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"\.metadata: not a readable distributed checkpoint"):
        read_distributed_metadata(directory)
