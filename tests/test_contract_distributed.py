"""The contract matrix's invariant 6, ranks agree: every method on 2 CPU ranks (gloo) under DDP and under FSDP2
(ModelParallelStrategy, `fully_shard` per block), against one process.

One launch of tests/distributed_scripts/contract_run.py per method (`--method`) runs the DDP fit, the FSDP2 fit and
the FSDP2 run resumed from its mid-epoch checkpoint in the same two processes. Then:
- every rank holds the same selection (indices, permutations, block positions), reselections and trained tensors;
- a 2-rank run with per-rank batch B trains what one process trains with batch 2B on the same examples per step:
  the same selection (scores / statistics are summed over ranks), values equal up to float summation order;
- the checkpoint (gathered under FSDP2) exports the whole delta;
- resuming the sharded run from its mid-epoch checkpoint reproduces it bit for bit;
- every checkpoint (DDP, FSDP2 gathered, FSDP2 distributed directory) holds only what trains.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from sparse_lightning.export import DELTA_WEIGHTS, export_checkpoint
from sparse_lightning.registry import names

pytestmark = pytest.mark.multiprocess

METHODS = names(sparse=True)  # every sparse method of the registry
STRATEGIES = ["ddp", "fsdp2"]
RANKS = 2
BATCH = 4  # per rank; the single-process reference reads RANKS * BATCH rows per step
ROWS = 64  # in tests/data/sst2_tiny/train.tsv


def launch(launch_ranks, script: Path, method: str, model_dir: Path, output: Path) -> None:
    """Run the script on RANKS CPU processes: DDP, FSDP2, then FSDP2 resumed."""
    launch_ranks(script, ["--method", method, "--model_dir", str(model_dir), "--output", str(output),
                          "--strategies", ",".join(STRATEGIES), "--resume", "fsdp2", "--devices", str(RANKS),
                          "--batch_size", str(BATCH)], f"the {method} runs", 400)


def results(output: Path) -> list[dict]:
    return [torch.load(output / f"rank{rank}.pt", weights_only=True) for rank in range(RANKS)]


@pytest.fixture(scope="module", params=METHODS)
def launched(request, contract: ModuleType, tiny_bert_cls_dir: Path, tmp_path_factory,
             launch_ranks) -> tuple[str, Path]:
    method = request.param
    output = tmp_path_factory.mktemp(f"ranks-{method}")
    launch(launch_ranks, Path(contract.__file__), method, tiny_bert_cls_dir, output)
    return method, output


@pytest.fixture(params=STRATEGIES)
def ranks(request, launched) -> tuple[str, str, list[dict], Path]:
    method, output = launched
    return method, request.param, results(output / request.param), output / request.param


@pytest.fixture(scope="module")
def single(launched, contract: ModuleType, tiny_bert_cls_dir: Path, tmp_path_factory) -> dict:
    """One process, batch RANKS * BATCH, reading at step t exactly the examples the ranks read at step t (both
    strategies read the same: shuffle=False, the sampler deals rows out in turn)."""
    method, output = launched
    orders = [r["orders"][0] for r in results(output / "ddp")]
    assert orders == [r["orders"][0] for r in results(output / "fsdp2")]
    for rank, order in enumerate(orders):
        assert order == list(range(rank, ROWS, RANKS))  # shuffle=False keeps the file order, split over ranks
    lines = (contract.DATA / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    rows = [i for t in range(contract.STEPS) for order in orders for i in order[t * BATCH:(t + 1) * BATCH]]
    root = tmp_path_factory.mktemp(f"single-{method}")
    (root / "train.tsv").write_text(lines[0] + "".join(lines[1 + i] for i in rows), encoding="utf-8")
    contract.run(tiny_bert_cls_dir, root / "run", method, batch_size=RANKS * BATCH, train_file=root / "train.tsv")
    return torch.load(root / "run" / "rank0.pt", weights_only=True)


@pytest.fixture(scope="module")
def plain_buffers(tiny_bert_cls_dir: Path) -> set[str]:
    """The base model's own buffers (position ids...): what is not the method's."""
    return {name for name, _ in AutoModelForSequenceClassification.from_pretrained(tiny_bert_cls_dir).named_buffers()}


def selection(result: dict, plain: set[str]) -> dict[str, torch.Tensor]:
    """What the method chose: delta indices, S2FT permutations and block positions."""
    return {name: tensor for name, tensor in result["buffers"].items() if name not in plain}


def test_every_rank_holds_the_same_selection_and_state(ranks, plain_buffers: set[str], contract: ModuleType) -> None:
    method, strategy, got, _ = ranks
    assert [r["world_size"] for r in got] == [RANKS] * RANKS
    assert [r["global_step"] for r in got] == [contract.STEPS] * RANKS
    first = selection(got[0], plain_buffers)
    assert first, "the method added no buffers: nothing to compare"
    for other in got[1:]:
        assert selection(other, plain_buffers).keys() == first.keys()
        for name, tensor in first.items():
            assert torch.equal(other["buffers"][name], tensor), (strategy, name)
        assert other["trained"].keys() == got[0]["trained"].keys()
        for name, tensor in got[0]["trained"].items():
            assert torch.equal(other["trained"][name], tensor), (strategy, name)  # gathered training state agrees
        assert other["reselections"] == got[0]["reselections"]
    deltas = [name for name in got[0]["trained"] if name.endswith(("delta_values", "delta_block"))]
    assert deltas
    if strategy == "fsdp2":  # the deltas really were sharded
        assert {got[0]["param_types"][name] for name in deltas} == {"DTensor"}
    for name, indices in first.items():
        if name.endswith("delta_indices"):
            assert indices.unique().numel() == indices.numel(), name
    if method.startswith("spiel"):  # a full and a partial reselection
        total_k = sum(t.numel() for n, t in first.items() if n.endswith("delta_indices"))
        (step1, replaced1), (step2, replaced2) = got[0]["reselections"]
        assert (step1, replaced1) == (1, total_k) and step2 == 3 and 0 < replaced2 < total_k


def test_ranks_train_what_one_process_trains_with_the_global_batch(ranks, single, plain_buffers: set[str]) -> None:
    method, strategy, got, _ = ranks
    assert single["global_step"] == got[0]["global_step"]
    expected = selection(single, plain_buffers)
    assert selection(got[0], plain_buffers).keys() == expected.keys()
    for name, tensor in expected.items():  # chosen from the same examples, scores summed over ranks
        assert torch.equal(got[0]["buffers"][name], tensor), (strategy, name)
    assert got[0]["reselections"] == single["reselections"]
    moved = 0
    for name, tensor in single["trained"].items():
        torch.testing.assert_close(got[0]["trained"][name], tensor, rtol=0, atol=1e-5, msg=f"{strategy} {name}")
        moved += name.endswith(("delta_values", "delta_block")) and bool(tensor.abs().max() > 1e-3)
    assert moved, "the deltas barely moved: the comparison would be vacuous"


EXPORTED = {"delta_values": "values", "delta_block": "block", "delta_indices": "indices",
            "delta_columns": "columns", "delta_rows": "rows"}


def test_checkpoint_exports_the_full_delta(ranks, tmp_path: Path) -> None:
    """The checkpoint (FSDP2: a full, gathered one) exports like a single-process one: rank 0's tensors."""
    method, strategy, got, output = ranks
    tensors = load_file(str(export_checkpoint(output / "last.ckpt", tmp_path / "export")["delta"] / DELTA_WEIGHTS))
    expected = {}
    for name, tensor in {**got[0]["buffers"], **got[0]["trained"]}.items():
        owner, _, leaf = name.rpartition(".")
        if leaf in EXPORTED:
            expected[f"{owner}.{EXPORTED[leaf]}"] = tensor
        elif name in got[0]["trained"]:  # the dense head
            expected[name] = tensor
    assert tensors.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensors[name], tensor), (strategy, name)


def test_resuming_the_sharded_run_reproduces_it(launched) -> None:
    method, output = launched
    uninterrupted, resumed = results(output / "fsdp2"), results(output / "fsdp2-resumed")
    for rank, (expected, got) in enumerate(zip(uninterrupted, resumed)):
        assert got["global_step"] == expected["global_step"]
        assert got["reselections"] == expected["reselections"]
        for key in ("buffers", "trained"):
            assert got[key].keys() == expected[key].keys()
            differ = [name for name, tensor in expected[key].items() if not torch.equal(got[key][name], tensor)]
            assert not differ, f"rank {rank}: {len(differ)} {key} differ, e.g. {differ[:3]}"


def test_the_checkpoint_holds_only_what_trains(ranks, plain_buffers: set[str]) -> None:
    """DDP: rank 0's file; FSDP2: only the trainable tensors are gathered, into one file like a single process's."""
    method, strategy, got, output = ranks
    checkpoint = torch.load(output / "last.ckpt", map_location="cpu", weights_only=True)
    saved = {name.removeprefix("model.") for name in checkpoint["state_dict"]}
    method_buffers = set(selection(got[0], plain_buffers))
    assert saved == set(got[0]["trained"]) | method_buffers, strategy
    assert checkpoint["sparse_lightning"]["holds_base"] is False


def test_a_distributed_checkpoint_directory_holds_only_what_trains_and_resumes(
        contract: ModuleType, tiny_bert_cls_dir: Path, tmp_path: Path, launch_ranks, plain_buffers: set[str]) -> None:
    """Lightning's default under FSDP2 (`save_distributed_checkpoint=True`): each rank writes its shards of the same
    filtered state dict; S2FT (the rebuilt base co-permuted as recorded) resumes from the directory bit for bit."""
    from torch.distributed.checkpoint import FileSystemReader

    launch_ranks(Path(contract.__file__), ["--method", "s2ft", "--model_dir", str(tiny_bert_cls_dir), "--output",
                                           str(tmp_path), "--strategies", "fsdp2_dcp", "--resume", "fsdp2_dcp",
                                           "--devices", str(RANKS), "--batch_size", str(BATCH)], "the s2ft runs", 400)
    uninterrupted, resumed = results(tmp_path / "fsdp2_dcp"), results(tmp_path / "fsdp2_dcp-resumed")
    directory = tmp_path / "fsdp2_dcp" / f"step={contract.CHECKPOINT_STEP}.ckpt"
    saved = {key.removeprefix("state_dict.model.")
             for key in FileSystemReader(directory).read_metadata().state_dict_metadata if key.startswith("state_dict.")}
    assert saved == set(uninterrupted[0]["trained"]) | set(selection(uninterrupted[0], plain_buffers))
    for rank, (expected, got) in enumerate(zip(uninterrupted, resumed)):
        for key in ("buffers", "trained"):
            differ = [name for name, tensor in expected[key].items() if not torch.equal(got[key][name], tensor)]
            assert not differ, f"rank {rank}: {len(differ)} {key} differ, e.g. {differ[:3]}"
