"""FSDP2 sharding of the HF model inside `configure_model` (ModelParallelStrategy's contract)."""

from __future__ import annotations

import torch
from torch import nn


def fully_shard_model(model: nn.Module, device_mesh, param_dtype: torch.dtype | None = None) -> None:
    """Shard each transformer block (HF `_no_split_modules`) and then the root, never the LightningModule.

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
    for module in model.modules():
        if type(module).__name__ in block_names:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
