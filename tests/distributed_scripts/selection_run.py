"""SIFT's bounded-memory selection on 2 CPU ranks (gloo): every rank ends with the same indices, those of the dense sum.

Each rank builds the same tiny LLaMA, attaches SIFT's deltas and scores its own calibration batches (`rank_batches`),
once on replicas (as under DDP) and once sharded with FSDP2 (`fully_shard` per block, as the library shards), from one
batch (top-k inside backward) and from several (groups of layers, each batch's gradient reduce-scattered into row
shards), with a budget that forces several groups; its MLP has an odd width, so some weights' rows split unevenly.
Then S2FT's gradient scores (`gradient_scores`, summed over ranks as S2FT sums them) the same ways, and a
`RowShardedSum` of a 5 x 3 weight with integer gradients (ties everywhere). Every rank writes `rank<r>.pt`:
{"<strategy>-<batches>": {name: indices}, "s2ft-<batches>": {group owner: unit scores}, "row-shards": {...}}.
tests/test_selection_memory.py compares them with one process's sums over both ranks' batches.

    python selection_run.py --output OUT [--ranks 2]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from sparse_lightning.callbacks import GradientTopKCallback  # noqa: E402
from sparse_lightning.distributed import all_reduce_sum_  # noqa: E402
from sparse_lightning.methods import select_by_gradient  # noqa: E402
from sparse_lightning.scoring.row_sharded_sums import RowShardedSum  # noqa: E402
from sparse_lightning.sparse import freeze_except, sparse_delta_layers  # noqa: E402
from sparse_lightning.structure import find_groups  # noqa: E402
from sparse_lightning.structure.scores import gradient_scores  # noqa: E402

VOCAB = 96
BATCH_COUNTS = (1, 3)
SCORE_MEMORY = 0.3  # several groups of layers
DENSITY = 0.05
PROBE_SHAPE, PROBE_K = (5, 3), 4


S2FT_ROLES = ["o", "v", "down", "up"]


def tiny_base() -> torch.nn.Module:
    """The same tiny GQA LLaMA on every rank and in the test."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=47, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_model() -> torch.nn.Module:
    """`tiny_base` with SIFT's deltas attached."""
    model = tiny_base()
    GradientTopKCallback(density=DENSITY).attach(model)
    freeze_except(model, [])
    return model


def rank_batches(rank: int, count: int) -> list[dict[str, torch.Tensor]]:
    """Rank `rank`'s own calibration batches."""
    generator = torch.Generator().manual_seed(100 + rank)
    ids = [torch.randint(1, VOCAB, (2, 10), generator=generator) for _ in range(count)]
    return [{"input_ids": i, "labels": i} for i in ids]


def probe_gradient(rank: int, batch: int) -> torch.Tensor:
    """Rank `rank`'s integer-valued gradient of the probe weight for batch `batch`: its sums tie often."""
    return torch.randint(-2, 3, PROBE_SHAPE, generator=torch.Generator().manual_seed(10 * rank + batch)).float()


def probe(rank: int) -> dict:
    sums = RowShardedSum(torch.Size(PROBE_SHAPE), torch.device("cpu"))
    for batch in range(2):
        sums.add_(probe_gradient(rank, batch))
    return {"rows": sums.total.shape[0], "own": sums.total[:sums.own_rows].clone(), "top_k": sums.top_k(PROBE_K)}


def worker(rank: int, world: int, output: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        from sparse_lightning.modules.fsdp2 import fully_shard_model

        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
        results = {}
        for strategy in ("replicas", "fsdp2"):
            for count in BATCH_COUNTS:
                model = tiny_model()
                if strategy == "fsdp2":
                    fully_shard_model(model, mesh)
                select_by_gradient(model, rank_batches(rank, count), lambda batch: model(**batch).loss,
                                   score_memory=SCORE_MEMORY)
                results[f"{strategy}-{count}"] = {name: layer.delta_indices.clone()
                                                  for name, layer in sparse_delta_layers(model).items()}
        for count in BATCH_COUNTS:  # S2FT scores the whole model on every rank, before any sharding
            model = tiny_base()
            results[f"s2ft-{count}"] = gradient_scores(model, find_groups(model), S2FT_ROLES, rank_batches(rank, count),
                                                       lambda batch: model(**batch).loss,
                                                       lambda t: all_reduce_sum_(t.clone()), SCORE_MEMORY)
        results["row-shards"] = probe(rank)
        torch.save(results, output / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    mp.spawn(worker, args=(args.ranks, args.output), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
