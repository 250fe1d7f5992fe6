"""FSDP2 sharding settings checked without launching ranks. The runs on 2 CPU ranks (DDP and FSDP2, every method,
against one process) are the contract matrix's: tests/test_contract_distributed.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForSequenceClassification

from sparse_lightning.modules.fsdp2 import fully_shard_model


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
