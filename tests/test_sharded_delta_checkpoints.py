"""Issue 29 item 2 under FSDP2: Lightning's ModelParallelStrategy loads a checkpoint itself (a distributed checkpoint
directory, or one gathered file) and, since a delta checkpoint leaves the rebuilt base out, must load it non-strictly;
the module checks the names of the saved tensors first (modules/sharded_checkpoint.py), as `load_state_dict` does in
one process: a checkpoint missing a trained tensor, or holding an unknown one, is refused in one line naming it, on
every rank, before anything changes. On 2 CPU ranks (tests/distributed_scripts/contract_run.py): a random-mask run
from an `init_delta` (the base loaded by shards, init_delta added to each rank's rows) saves a delta checkpoint in
both forms, and the run resumed from it ends bit for bit where the uninterrupted run ends.
"""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path
from types import ModuleType

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn
from transformers import AutoModelForSequenceClassification

from sparse_lightning.callbacks import RandomMaskCallback
from sparse_lightning.delta_checkpoint import CheckpointKeysError
from sparse_lightning.export import export_model
from sparse_lightning.modules import SequenceClassificationModule
from sparse_lightning.modules.sharded_checkpoint import MODEL_PREFIX, saved_tensor_names

pytestmark = pytest.mark.usefixtures("one_thread")
FORMS = {"fsdp2": "one gathered file", "fsdp2_dcp": "a distributed checkpoint directory"}
RANKS = 2


def fitted(contract: ModuleType, model_dir: Path, root: Path) -> tuple[SequenceClassificationModule, Path]:
    """Two random-mask steps in one process and the delta checkpoint they save."""
    module, _ = contract.run(model_dir, root, "random_mask")
    return module, root / "last.ckpt"


def without(path: Path, key: str, target: Path) -> Path:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    del checkpoint["state_dict"][key]
    torch.save(checkpoint, target)
    return target


def test_one_process_refuses_a_missing_or_unknown_tensor_naming_the_checkpoint(contract: ModuleType,
                                                                             tiny_bert_cls_dir: Path,
                                                                             tmp_path: Path) -> None:
    """`load_state_dict` (one process, DDP) and the check run before Lightning's FSDP2 loader, on the same files:
    the same one line, and nothing of the module changes."""
    module, path = fitted(contract, tiny_bert_cls_dir, tmp_path / "run")
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    key = next(name for name in state if name.endswith("delta_values"))
    missing = without(path, key, tmp_path / "missing.ckpt")
    before = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    with pytest.raises(CheckpointKeysError, match=rf"^this checkpoint does not fit this SequenceClassificationModule: "
                                                  rf"1 trained tensor\(s\) missing \(e\.g\. {key}\)") as error:
        module.load_state_dict({name: value for name, value in state.items() if name != key})
    assert "\n" not in str(error.value)
    with pytest.raises(CheckpointKeysError, match=rf"^{missing} does not fit .*1 trained tensor\(s\) missing "
                                                  rf"\(e\.g\. {key}\)"):
        module._check_saved_tensors(missing)
    extra = dict(state, **{"model.classifier.delta_values": state[key]})
    torch.save({**torch.load(path, weights_only=True), "state_dict": extra}, tmp_path / "extra.ckpt")
    with pytest.raises(CheckpointKeysError, match=r"1 unknown tensor\(s\) \(e\.g\. model\.classifier\.delta_values\)"):
        module._check_saved_tensors(tmp_path / "extra.ckpt")
    with pytest.raises(CheckpointKeysError, match="1 unknown tensor"):
        module.load_state_dict(extra)
    module._check_saved_tensors(path)  # the checkpoint as saved fits
    (tmp_path / "empty").mkdir()
    assert saved_tensor_names(path) == set(state)
    assert saved_tensor_names(tmp_path / "nothing") is None and saved_tensor_names(tmp_path / "empty") is None
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_validating_a_delta_checkpoint_under_fsdp2_is_refused_naming_the_remedy(contract: ModuleType,
                                                                                 tiny_bert_cls_dir: Path,
                                                                                 tmp_path: Path) -> None:
    """validate/test build the model without the method, and under FSDP2 the checkpoint cannot recreate its delta
    layers after sharding (one process does, in `on_load_checkpoint`): refused rather than evaluating the base
    without the deltas."""
    _, path = fitted(contract, tiny_bert_cls_dir, tmp_path / "run")
    module = SequenceClassificationModule(str(tiny_bert_cls_dir))
    module.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    module.trainer.state.fn = TrainerFn.VALIDATING
    module.configure_model()
    with pytest.raises(CheckpointKeysError, match=rf"^{path} holds sparse deltas \(e\.g\. .*delta_values\), but "
                                                  r"validate under FSDP2 builds the model without its method.*run it "
                                                  r"on one device or under DDP") as error:
        module._check_saved_tensors(path)
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def init_delta(tiny_bert_cls_dir: Path, tmp_path_factory) -> Path:
    """Random-mask entries of the query and value weights and a dense classifier, exported: what the FSDP2 runs
    start from."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_cls_dir).requires_grad_(False)
    RandomMaskCallback(density=0.1, target_modules=["query", "value"]).attach(model)
    model.classifier.weight.requires_grad_(True)
    torch.manual_seed(1)
    for param in model.parameters():
        if param.requires_grad:
            param.data.normal_(0.0, 0.05)
    path = tmp_path_factory.mktemp("init-delta") / "delta"
    export_model(model, path, base_model=str(tiny_bert_cls_dir))
    return path


@pytest.fixture(scope="module")
def sharded_runs(contract: ModuleType, tiny_bert_cls_dir: Path, init_delta: Path, tmp_path_factory,
                 launch_ranks) -> Path:
    """In both forms: the uninterrupted run and the run resumed from its mid-epoch checkpoint, from init_delta."""
    output = tmp_path_factory.mktemp("fsdp2-init-delta")
    launch_ranks(Path(contract.__file__), ["--method", "random_mask", "--model_dir", str(tiny_bert_cls_dir),
                                           "--output", str(output), "--strategies", ",".join(FORMS),
                                           "--resume", ",".join(FORMS), "--init_delta", str(init_delta),
                                           "--devices", str(RANKS), "--batch_size", "4"],
                 "the FSDP2 runs from init_delta", 400)
    return output


def results(folder: Path) -> list[dict]:
    return [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in range(RANKS)]


@pytest.mark.multiprocess
@pytest.mark.parametrize("form", list(FORMS))
def test_a_run_from_init_delta_resumes_from_its_delta_checkpoint_bit_for_bit(form: str, sharded_runs: Path,
                                                                            contract: ModuleType) -> None:
    """The checkpoint holds what trains and no base weight; the resumed run rebuilds the base by shards, adds
    init_delta, loads the deltas and head, and its last step's loss and every trained tensor equal the
    uninterrupted run's."""
    checkpoint = sharded_runs / form / f"step={contract.CHECKPOINT_STEP}.ckpt"
    saved = saved_tensor_names(checkpoint)
    uninterrupted, resumed = results(sharded_runs / form), results(sharded_runs / f"{form}-resumed")
    assert {name.removeprefix("model.") for name in saved} >= set(uninterrupted[0]["trained"])
    assert "model.bert.embeddings.word_embeddings.weight" not in saved
    for rank, (expected, got) in enumerate(zip(uninterrupted, resumed)):
        assert expected["built_on_meta"] and got["built_on_meta"]  # each rank read its own rows
        assert expected["init_delta_merged"] and got["init_delta_merged"]
        assert got["global_step"] == expected["global_step"] == contract.STEPS
        assert len(got["losses"]) == contract.STEPS - contract.CHECKPOINT_STEP
        assert got["losses"][-1] == expected["losses"][-1], rank
        assert got["trained"].keys() == expected["trained"].keys()
        differ = [name for name, tensor in expected["trained"].items() if not torch.equal(got["trained"][name], tensor)]
        assert not differ, f"rank {rank}: {len(differ)} trained tensors differ, e.g. {differ[:3]}"


def damaged(checkpoint: Path, key: str, extra: bool, target: Path) -> None:
    """The checkpoint with `key` left out (or an unknown tensor added beside it): in a file, its state dict; in a
    distributed checkpoint directory, its metadata (the shards stay as written)."""
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        tensors = state["state_dict"]
        state["state_dict"] = {**tensors, key.replace("query", "key_unknown"): tensors[key]} if extra else \
            {name: tensor for name, tensor in tensors.items() if name != key}
        torch.save(state, target)
        return
    from torch.distributed.checkpoint import FileSystemReader

    shutil.copytree(checkpoint, target)
    metadata = FileSystemReader(str(target)).read_metadata()
    entries = metadata.state_dict_metadata
    if extra:
        entries[MODEL_PREFIX + key.replace("query", "key_unknown")] = entries[MODEL_PREFIX + key]
    else:
        del entries[MODEL_PREFIX + key]
    (target / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.mark.multiprocess
def test_a_checkpoint_missing_a_trained_tensor_is_refused_on_every_rank(sharded_runs: Path, contract: ModuleType,
                                                                      tiny_bert_cls_dir: Path, init_delta: Path,
                                                                      launch_ranks) -> None:
    """One delta's values left out, or an unknown tensor added, in either form: both ranks raise the same one line
    naming the checkpoint and the tensor before training (none waits on the other: the launch has a timeout)."""
    key = "model.bert.encoder.layer.0.attention.self.query.delta_values"
    names = {"missing.ckpt": False, "unknown.ckpt": True}
    for form in FORMS:
        checkpoint = sharded_runs / form / f"step={contract.CHECKPOINT_STEP}.ckpt"
        assert key in saved_tensor_names(checkpoint)
        for name, extra in names.items():
            damaged(checkpoint, key, extra, sharded_runs / form / name)
    launch_ranks(Path(contract.__file__), ["--method", "random_mask", "--model_dir", str(tiny_bert_cls_dir),
                                           "--output", str(sharded_runs), "--strategies", "",
                                           "--resume", ",".join(FORMS), "--resume_from", ",".join(names),
                                           "--init_delta", str(init_delta), "--devices", str(RANKS),
                                           "--batch_size", "4"], "the resumes from damaged checkpoints", 300)
    for form in FORMS:
        for name, extra in names.items():
            problem = rf"1 unknown tensor\(s\) \(e\.g\. {key.replace('query', 'key_unknown')}\)" if extra else \
                rf"1 trained tensor\(s\) missing \(e\.g\. {key}\)"
            for rank, result in enumerate(results(sharded_runs / f"{form}-from-{name}")):
                assert set(result) == {"error"}, (form, name, rank)  # refused before training: no results
                error = result["error"]
                assert "\n" not in error
                assert re.match(rf"^{re.escape(str(sharded_runs / form / name))} does not fit this "
                                rf"SequenceClassificationModule: {problem}", error), (form, name, rank, error)
