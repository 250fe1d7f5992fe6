"""FSDP2 sharding of the HF model inside `configure_model` (ModelParallelStrategy's contract)."""

from __future__ import annotations

import torch
from torch import nn


def end_units(model: nn.Module) -> list[nn.Module]:
    """The input embedding and an untied output head, each sharded as its own FSDP2 unit.

    In the root unit they would stay unsharded for the whole step (FSDP2 keeps the root gathered from forward to
    the end of backward); as their own units the embedding is gathered for its forward only and the head for its
    forward and backward. A tied weight is one parameter used at both ends, so it stays in the root; one inside a
    block unit (BERT lists `BertEmbeddings` in `_no_split_modules`) is sharded with that block.
    """
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    in_blocks = {id(m) for block in model.modules() if type(block).__name__ in block_names for m in block.modules()}
    ends = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            module = None
        if isinstance(module, nn.Module) and id(module) not in in_blocks and any(True for _ in module.parameters()):
            ends.append(module)
    if len(ends) == 2 and {id(p) for p in ends[0].parameters()} & {id(p) for p in ends[1].parameters()}:
        return []
    return ends


def fully_shard_model(model: nn.Module, device_mesh, param_dtype: torch.dtype | None = None) -> None:
    """Shard each transformer block (HF `_no_split_modules`), the untied embedding and head (`end_units`), and then
    the root, never the LightningModule.

    Frozen base weights and trainable fp32 deltas share a unit: FSDP2 keeps per-parameter
    `requires_grad`, and with `param_dtype` it computes in that dtype while reducing in fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    if not block_names:
        raise ValueError(f"{type(model).__name__} declares no _no_split_modules; cannot choose FSDP2 units")
    dims = device_mesh.mesh_dim_names or ()
    tensor_parallel = device_mesh["tensor_parallel"].size() if "tensor_parallel" in dims else 1
    if tensor_parallel > 1:
        raise ValueError(
            "sparse_lightning shards with FSDP2 over data-parallel ranks only (no tensor parallelism), but the "
            f"device mesh puts {tensor_parallel} ranks on its tensor-parallel dim (ModelParallelStrategy's default "
            "tensor_parallel_size='auto' means every device of a node): pass "
            "ModelParallelStrategy(data_parallel_size=<number of devices>, tensor_parallel_size=1)"
        )
    mesh = device_mesh["data_parallel"] if "data_parallel" in dims else device_mesh
    ends = end_units(model)  # before sharding: fully_shard renames each unit's class (FSDPBertEmbeddings)
    for module in model.modules():
        if type(module).__name__ in block_names:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    for module in ends:
        fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
