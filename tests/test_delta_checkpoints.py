"""Issue 29 item 2 and issue 26 case 9: a checkpoint holds what trains, never the frozen base.

Every consumer rebuilds the base from `model_name_or_path` and refuses a different one; `full_checkpoint=True` keeps the
whole model; checkpoints written before delta checkpoints still load; resuming another method's checkpoint is refused.
Resume bit for bit is tests/test_contract.py and tests/test_edges_resume.py (kill -9); FSDP2 and DDP are
tests/test_contract_distributed.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import ModuleType

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from sparse_lightning.delta_checkpoint import BaseMismatchError, base_fingerprint, check_same_base
from sparse_lightning.export import CheckpointError, export_checkpoint
from sparse_lightning.modules import SequenceClassificationModule
from sparse_lightning.modules.lora import LoRASettings
from sparse_lightning.registry import names

pytestmark = pytest.mark.usefixtures("one_thread")
#: The buffers saved beside what trains: where the deltas sit, that they were chosen, S2FT's records.
STRUCTURE_BUFFERS = ("delta_indices", "delta_selected", "delta_columns", "delta_rows", "delta_row_start",
                     "s2ft_head_order", "s2ft_channel_order")


def fit(contract: ModuleType, model_dir: Path, root: Path, method: str, steps: int = 2, resume: Path | None = None,
        overrides: dict | None = None, **module_kwargs) -> tuple[SequenceClassificationModule, Path]:
    """`steps` steps of a contract method (or "lora") on the tiny SST-2 file, its settings updated by `overrides`;
    returns the module and its last checkpoint."""
    pl.seed_everything(0, verbose=False)
    if method == "lora":
        callbacks, optimizer = [], lambda params: torch.optim.AdamW(params, lr=1e-2)
        module_kwargs["lora"] = LoRASettings(r=2)
    else:
        callback, optimizer = contract.build_method(method, **(overrides or {}))
        callbacks = [callback]
    module = SequenceClassificationModule(str(model_dir), optimizer=optimizer, **module_kwargs)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=0, logger=False, callbacks=callbacks,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root))
    trainer.fit(module, contract.make_datamodule(model_dir), ckpt_path=resume)
    trainer.save_checkpoint(root / "last.ckpt")
    return module, root / "last.ckpt"


def first_batch(glue_datamodule, model_dir: Path) -> dict[str, torch.Tensor]:
    datamodule = glue_datamodule(model_dir)
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


def read(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("method", [*names(sparse=True), "lora"])  # every sparse method of the registry, and LoRA
def test_a_checkpoint_holds_what_trains_and_no_frozen_weight(method: str, contract: ModuleType,
                                                             tiny_bert_cls_dir: Path, tmp_path: Path) -> None:
    module, path = fit(contract, tiny_bert_cls_dir, tmp_path, method)
    checkpoint = read(path)
    frozen = {name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    saved = set(checkpoint["state_dict"])
    assert trainable <= saved and not saved & frozen
    assert {key.rpartition(".")[2] for key in saved - trainable} <= set(STRUCTURE_BUFFERS)
    assert checkpoint["sparse_lightning"]["holds_base"] is False
    stored = sum(t.numel() for t in checkpoint["state_dict"].values())
    assert stored < 0.05 * sum(p.numel() for p in module.parameters())  # the tiny BERT: a few % train


def test_every_consumer_works_from_a_delta_checkpoint_like_from_a_full_one(contract: ModuleType, tiny_bert_cls_dir: Path,
                                                                          tmp_path: Path, glue_datamodule) -> None:
    """S2FT: the rebuilt base must be co-permuted as recorded before the blocks land on it."""
    _, delta = fit(contract, tiny_bert_cls_dir, tmp_path / "delta", "s2ft")
    _, full = fit(contract, tiny_bert_cls_dir, tmp_path / "full", "s2ft", full_checkpoint=True)
    assert read(full)["sparse_lightning"]["holds_base"] is True
    assert delta.stat().st_size < full.stat().st_size / 3
    batch = first_batch(glue_datamodule, tiny_bert_cls_dir)
    logits = {}
    for name, path in (("delta", delta), ("full", full)):
        module = SequenceClassificationModule.load_from_checkpoint(path, map_location="cpu").eval()
        with torch.no_grad():
            logits[name] = module(batch).logits
        export_checkpoint(path, tmp_path / f"export-{name}", merged=True)
    assert torch.equal(logits["delta"], logits["full"])
    merged = [AutoModelForSequenceClassification.from_pretrained(tmp_path / f"export-{name}" / "merged").eval()
              for name in ("delta", "full")]
    for a, b in zip(merged[0].state_dict().values(), merged[1].state_dict().values()):
        assert torch.equal(a, b)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[contract.build_method("s2ft")[0]], default_root_dir=str(tmp_path))
    scores = [trainer.validate(SequenceClassificationModule(str(tiny_bert_cls_dir)),
                               glue_datamodule(tiny_bert_cls_dir), ckpt_path=path, verbose=False)
              for path in (delta, full)]
    assert scores[0] == scores[1]


def test_a_checkpoint_written_before_delta_checkpoints_still_loads(contract: ModuleType, tiny_bert_cls_dir: Path,
                                                                   tmp_path: Path, glue_datamodule) -> None:
    trained, path = fit(contract, tiny_bert_cls_dir, tmp_path, "sift", full_checkpoint=True)
    old = read(path)
    del old["sparse_lightning"]["holds_base"], old["sparse_lightning"]["base_fingerprint"]
    del old["hyper_parameters"]["full_checkpoint"]
    torch.save(old, tmp_path / "old.ckpt")
    reloaded = SequenceClassificationModule.load_from_checkpoint(tmp_path / "old.ckpt", map_location="cpu").eval()
    batch = first_batch(glue_datamodule, tiny_bert_cls_dir)
    with torch.no_grad():
        assert torch.equal(reloaded(batch).logits, trained.eval()(batch).logits)


@pytest.fixture(scope="module")
def other_base(tmp_path_factory, tiny_bert_cls_dir: Path) -> Path:
    """The tiny BERT's architecture with other weights."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_cls_dir)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01)
    path = tmp_path_factory.mktemp("other-base")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_bert_cls_dir).save_pretrained(path)
    return path


def test_a_checkpoint_of_another_base_is_refused_naming_both(contract: ModuleType, tiny_bert_cls_dir: Path,
                                                            other_base: Path, tmp_path: Path) -> None:
    _, path = fit(contract, tiny_bert_cls_dir, tmp_path, "sift")
    with pytest.raises(BaseMismatchError) as refused:
        SequenceClassificationModule.load_from_checkpoint(path, map_location="cpu", model_name_or_path=str(other_base))
    message = str(refused.value)
    assert "\n" not in message and str(tiny_bert_cls_dir) in message and str(other_base) in message
    with pytest.raises(BaseMismatchError, match=f"{path}.*{other_base}"):  # resuming onto another base
        fit(contract, other_base, tmp_path / "resumed", "sift", steps=3, resume=path)
    # export names the file it refuses
    checkpoint = read(path)
    checkpoint["hyper_parameters"]["model_name_or_path"] = str(other_base)
    torch.save(checkpoint, tmp_path / "moved.ckpt")
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'moved.ckpt'}: .*{other_base}"):
        export_checkpoint(tmp_path / "moved.ckpt", tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_a_base_with_the_same_weights_but_another_rope_base_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The same safetensors with `rope_theta` edited in config.json: same shapes and weights, another function."""
    from transformers import AutoModelForCausalLM

    edited = tmp_path / "edited"
    shutil.copytree(tiny_llama_dir, edited)
    config = json.loads((edited / "config.json").read_text())
    config["rope_theta"] = 12345.0
    if isinstance(config.get("rope_parameters"), dict):
        config["rope_parameters"]["rope_theta"] = 12345.0
    (edited / "config.json").write_text(json.dumps(config))
    trained_on = base_fingerprint(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), "tiny")
    now = base_fingerprint(AutoModelForCausalLM.from_pretrained(edited), "edited")
    assert now["weights"] == trained_on["weights"] and now["architecture"] == trained_on["architecture"]
    with pytest.raises(BaseMismatchError, match=r"^last.ckpt holds a delta trained on base 'tiny' with other config "
                                                r"values than this run's 'edited' \(rope_\w+ .*12345"):
        check_same_base(trained_on, now, "last.ckpt")
    check_same_base({**trained_on, "config": None}, now, "last.ckpt")  # written before the config was kept: passes
    check_same_base(trained_on, {**trained_on, "model": "alias"}, "last.ckpt")


@pytest.mark.parametrize(("saved_by", "resumed_with"), [("sift", "spiel_ag"), ("spiel_ag", "sift"), ("sift", "s2ft")])
def test_resuming_another_methods_checkpoint_is_refused(saved_by: str, resumed_with: str, contract: ModuleType,
                                                       tiny_bert_cls_dir: Path, tmp_path: Path) -> None:
    """Issue 26, case 9: SpIEL resumed from SIFT (and the reverse) used to train on and save as the other method; S2FT
    from SIFT ended in an AttributeError."""
    same_budget = {"density": None, "num_params": 2000}  # SIFT's and SpIEL's deltas then have the same shapes
    _, path = fit(contract, tiny_bert_cls_dir, tmp_path / "first", saved_by, overrides=same_budget)
    recorded, method = (contract.build_method(name)[0].method for name in (saved_by, resumed_with))
    with pytest.raises(ValueError, match=f"^{path} was saved by a {recorded} run, but this run trains "
                                         f"{method}: resume with the same method") as refused:
        fit(contract, tiny_bert_cls_dir, tmp_path / "second", resumed_with, steps=4, resume=path,
            overrides=None if resumed_with == "s2ft" else same_budget)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "second" / "last.ckpt").exists()


def test_a_run_from_init_delta_reloads_onto_base_plus_init_delta(contract: ModuleType, tiny_bert_cls_dir: Path,
                                                                tmp_path: Path, glue_datamodule) -> None:
    """The checkpoint holds only the new delta: a reload (no trainer) merges `init_delta` into the rebuilt base first."""
    _, first = fit(contract, tiny_bert_cls_dir, tmp_path / "first", "sift")
    start = export_checkpoint(first, tmp_path / "start")["delta"]
    trained, path = fit(contract, tiny_bert_cls_dir, tmp_path / "second", "random_mask", init_delta=str(start))
    reloaded = SequenceClassificationModule.load_from_checkpoint(path, map_location="cpu").eval()
    batch = first_batch(glue_datamodule, tiny_bert_cls_dir)
    with torch.no_grad():
        assert torch.equal(reloaded(batch).logits, trained.eval()(batch).logits)


def test_a_base_waiting_to_be_loaded_by_shards_has_the_same_fingerprint(tiny_llama_dir: Path) -> None:
    """Under FSDP2 the base is built on the meta device and loaded by shards: its weights digest is read from the file."""
    from transformers import AutoModelForCausalLM

    from sparse_lightning.modules.sharded_loading import build_on_meta, checkpoint_files

    built = base_fingerprint(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), "tiny")
    meta, plan = build_on_meta(AutoModelForCausalLM, tiny_llama_dir, checkpoint_files(tiny_llama_dir), ())
    assert built["weights"] is not None and base_fingerprint(meta, "tiny", plan) == built
    as_bf16 = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    assert base_fingerprint(as_bf16, "tiny") == built  # the same file built in bf16: the same base


def test_a_base_permuted_another_way_is_put_back_and_permuted_as_recorded(tiny_llama_dir: Path) -> None:
    """A resumed S2FT run that selected other units: its base ends exactly as if permuted by the checkpoint's orders."""
    from transformers import AutoModelForCausalLM

    from sparse_lightning.structure import find_groups, order_buffer, permute_group
    from sparse_lightning.structure.permute import permute_as_recorded

    def orders(seed: int, model) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        picked = {}
        for group in find_groups(model):
            size = group.group_size
            blocks = torch.randperm(group.num_units // size, generator=generator)  # whole KV groups move together
            picked[f"{group.owner}.{order_buffer(group)}"] = (blocks[:, None] * size + torch.arange(size)).flatten()
        return picked

    resumed, expected = (AutoModelForCausalLM.from_pretrained(tiny_llama_dir) for _ in range(2))
    for model, seed in ((resumed, 1), (expected, 2)):
        groups = {f"{g.owner}.{order_buffer(g)}": g for g in find_groups(model)}
        for key, order in orders(seed, model).items():
            permute_group(model, groups[key], order)
    assert not torch.equal(resumed.state_dict()["model.layers.0.mlp.down_proj.weight"],
                           expected.state_dict()["model.layers.0.mlp.down_proj.weight"])
    permute_as_recorded(resumed, orders(2, expected))
    got, want = resumed.state_dict(), expected.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[key], want[key]) for key in want)
