"""The contract every sparse method keeps, one matrix over methods (SIFT, SpIEL-AG, SpIEL-MA, S2FT, random mask):

1. the merged export predicts what the trained module predicts;
2. `apply_delta` on a fresh base equals the merged model, bit for bit;
3. resuming from a mid-epoch checkpoint equals the uninterrupted run, bit for bit (fp32, CPU), selecting nothing
   again (the checkpoint's selection wins over the callback's settings);
4. `load_from_checkpoint` on a weights-only checkpoint rebuilds a module that predicts the same;
5. only the delta values / blocks and the dense head train, and their count is what the method's budget says.

Rows run on tiny BERT (sequence classification, the tiny SST-2 file); causal-LM rows on tiny LLaMA (grouped-query
attention, tied embeddings, no new head) cover 1, 2, 4 and 5. Ranks agreeing (invariant 6) is tests/test_contract_distributed.py.
Each method is built in one place, tests/distributed_scripts/contract_run.py (the `contract` fixture), which also
runs it. Method-specific behaviour (SIFT's top-k, SpIEL's schedule, S2FT's permutation geometry) is tested in the
methods' own files.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType, SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from sparse_lightning.export import apply_delta, export_checkpoint
from sparse_lightning.methods import Calibration
from sparse_lightning.modules import CausalLMModule, SequenceClassificationModule
from sparse_lightning.registry import names

METHODS = names(sparse=True)  # every sparse method of the registry
#: A resumed run is built with other settings where they would choose differently: the checkpoint must win.
RESUME_OVERRIDES = {"s2ft": {"seed": 99, "select_by": "random"}, "random_mask": {"seed": 99}}
HEAD = {"model.classifier.weight", "model.classifier.bias"}


def method_tensors(module: pl.LightningModule) -> set[str]:
    """The names of the module's delta values and blocks."""
    return {name for name, _ in module.named_parameters() if name.endswith(("delta_values", "delta_block"))}


def assert_same_predictions(method: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit for bit, except S2FT: its trained module computes in the co-permuted layout (the merged model in the
    original one), so matmuls sum in another order; there the contract is fp32 max abs diff <= 1e-5, same argmax."""
    if method == "s2ft":
        assert (got - expected).abs().max() <= 1e-5 and torch.equal(got.argmax(-1), expected.argmax(-1))
    else:
        assert torch.equal(got, expected), f"max abs diff {(got - expected).abs().max():.3g}"


def budget(method: str, config, total_params: int) -> int:
    """Trainable entries the row's settings ask for (contract_run.METHODS), from the tiny BERT's geometry: 4 target
    weights [H, H] per layer (query, key, value, attention.output.dense)."""
    layers, hidden = config.num_hidden_layers, config.hidden_size
    head_dim = hidden // config.num_attention_heads
    if method in ("sift", "random_mask"):  # density 0.05 per weight: int(0.05 * numel) + 1 entries each
        return 4 * layers * (int(0.05 * hidden * hidden) + 1)
    if method.startswith("spiel"):  # density 0.002 of all the model's parameters
        return int(0.002 * total_params)
    assert method == "s2ft"  # 1 head (v rows, o columns) and 8 channels (up rows, down columns) per layer
    return layers * (2 * 1 * head_dim * hidden + 2 * 8 * hidden)


@pytest.fixture(scope="module")
def dev_batch(glue_datamodule, tiny_bert_cls_dir: Path) -> dict[str, torch.Tensor]:
    datamodule = glue_datamodule(tiny_bert_cls_dir)
    datamodule.setup("validate")
    return next(iter(datamodule.val_dataloader()))  # the 16 dev rows


@pytest.fixture(scope="module", params=METHODS)
def trained(request, contract: ModuleType, tiny_bert_cls_dir: Path, tmp_path_factory) -> SimpleNamespace:
    """The method's uninterrupted run: contract.STEPS steps, checkpoints at step 3 (full), last and weights only."""
    method = request.param
    root = tmp_path_factory.mktemp(method)
    module, trainer = contract.run(tiny_bert_cls_dir, root / "full", method)
    assert trainer.global_step == contract.STEPS
    return SimpleNamespace(method=method, module=module, trainer=trainer, root=root,
                           checkpoints=root / "full", callback=trainer.callbacks[0])


@pytest.fixture(scope="module")
def exported(trained) -> dict[str, Path]:
    return export_checkpoint(trained.checkpoints / "last.ckpt", trained.root / "export", merged=True)


@pytest.fixture(scope="module")
def resumed(trained, contract: ModuleType, tiny_bert_cls_dir: Path) -> SimpleNamespace:
    def no_calibration(*args, **kwargs):
        raise AssertionError("a resumed run must not select again")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Calibration, "batches", no_calibration)
        module, trainer = contract.run(tiny_bert_cls_dir, trained.root / "resumed", trained.method,
                                       resume=trained.checkpoints / f"step={contract.CHECKPOINT_STEP}.ckpt",
                                       overrides=RESUME_OVERRIDES.get(trained.method))
    return SimpleNamespace(module=module, trainer=trainer, callback=trainer.callbacks[0])


def test_merged_export_predicts_what_the_trained_module_predicts(trained, exported, dev_batch) -> None:
    merged = AutoModelForSequenceClassification.from_pretrained(exported["merged"]).eval()
    assert not [name for name in merged.state_dict() if "delta" in name or "s2ft" in name]
    module = trained.module.eval()
    with torch.no_grad():
        expected, got = module(dev_batch).logits, merged(**dev_batch).logits
    assert_same_predictions(trained.method, got, expected)


def test_apply_delta_on_a_fresh_base_equals_the_merged_model(trained, exported, tiny_bert_cls_dir: Path) -> None:
    merged = AutoModelForSequenceClassification.from_pretrained(exported["merged"]).state_dict()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_cls_dir)
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    apply_delta(base, exported["delta"])
    after = base.state_dict()
    assert after.keys() == merged.keys()
    differ = [name for name, tensor in after.items() if not torch.equal(tensor, merged[name])]
    assert not differ, f"{len(differ)} tensors differ from the merged model, e.g. {differ[:3]}"
    changed = {name for name, tensor in after.items() if not torch.equal(tensor, before[name])}
    targets = {name.removeprefix("model.").rsplit(".", 1)[0] + ".weight" for name in method_tensors(trained.module)}
    assert changed == targets | {"classifier.weight", "classifier.bias"}  # every trained weight, nothing else


def test_resume_equals_the_uninterrupted_run(trained, resumed, contract: ModuleType) -> None:
    middle = torch.load(trained.checkpoints / f"step={contract.CHECKPOINT_STEP}.ckpt", map_location="cpu",
                        weights_only=True)
    assert middle["global_step"] == contract.CHECKPOINT_STEP < contract.STEPS  # a mid-epoch checkpoint
    assert middle["sparse_lightning"]["method"] == trained.callback.method
    # optimizer state exists for exactly the trainable tensors, shaped like them (it scales with the delta)
    trainable = [p for p in trained.module.parameters() if p.requires_grad]
    slots = middle["optimizer_states"][0]["state"]
    assert len(slots) == len(trainable)
    for slot, param in zip(slots.values(), trainable):
        if "exp_avg" in slot:  # AdamW; SM3's row and column accumulators are tests/test_spiel.py's
            assert slot["exp_avg"].shape == slot["exp_avg_sq"].shape == param.shape
    assert resumed.trainer.global_step == contract.STEPS

    # the whole model, frozen base included (a checkpoint holds what trains: the rebuilt base must match too)
    expected, got = trained.module.model.state_dict(), resumed.module.model.state_dict()
    assert got.keys() == expected.keys()
    differ = [name for name, tensor in expected.items() if not torch.equal(got[name], tensor)]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"
    # and the resumed run did train: its deltas moved away from the checkpoint's
    start = middle["state_dict"]
    assert any(not torch.equal(start[name], got[name.removeprefix("model.")]) for name in method_tensors(trained.module))
    if trained.method.startswith("spiel"):  # the reselection after the checkpoint happened, as uninterrupted
        assert [r["step"] for r in resumed.callback.history] == [r["step"] for r in trained.callback.history] == [1, 3]
        (state,) = [v for k, v in middle["callbacks"].items() if k.startswith("PruneRegrowCallback")]
        assert [record["step"] for record in state["history"]] == [1]
        if trained.method == "spiel_ag":  # the checkpoint sits inside a statistics window, which travels with it
            assert state["stats"] and all(int(s["count"]) == 1 for s in state["stats"].values())


def test_load_from_checkpoint_round_trips(trained, dev_batch) -> None:
    path = trained.checkpoints / "weights.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert "optimizer_states" not in checkpoint and "callbacks" not in checkpoint  # weights and our metadata only
    reloaded = SequenceClassificationModule.load_from_checkpoint(path, map_location="cpu").eval()
    expected = trained.module.model.state_dict()  # the rebuilt base too: the checkpoint holds only what trains
    assert reloaded.model.state_dict().keys() == expected.keys()
    for name, tensor in reloaded.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    module = trained.module.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(dev_batch).logits, module(dev_batch).logits)
        assert torch.equal(reloaded.predict_step(dev_batch, 0), module.predict_step(dev_batch, 0))


def test_trainable_count_is_the_method_budget(trained, tiny_bert_cls_dir: Path) -> None:
    module = trained.module
    trainable = {name: p for name, p in module.named_parameters() if p.requires_grad}
    deltas = method_tensors(module)
    assert deltas and set(trainable) == deltas | HEAD
    optimized = {id(p) for group in trained.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in trainable.values()}

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_cls_dir)
    total = sum(p.numel() for p in base.parameters())
    expected = budget(trained.method, base.config, total)
    assert sum(trainable[name].numel() for name in deltas) == expected
    head = base.classifier.weight.numel() + base.classifier.bias.numel()
    assert module.trainable_parameters == expected + head  # what on_fit_start reported


# -- the causal-LM rows: tiny LLaMA with grouped-query attention (4 query heads, 2 KV heads) ------------------------

LM_METHODS = METHODS
LM_OVERRIDES = {"s2ft": {"num_heads": 2}}  # one whole KV group (gqa="groups")


class TokenRows(pl.LightningDataModule):
    """16 random byte sequences of 12 tokens, labelled with themselves, in batches of 4."""

    def __init__(self) -> None:
        super().__init__()
        self.ids = torch.randint(0, 256, (16, 12), generator=torch.Generator().manual_seed(0))

    def train_dataloader(self) -> DataLoader:
        rows = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in self.ids]
        return DataLoader(rows, batch_size=4)


def lm_budget(method: str, config, total_params: int) -> int:
    layers, hidden, inter = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    if method in ("sift", "random_mask"):  # q, k, v, o, gate, up, down: int(0.05 * numel) + 1 each
        shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden)] + [(inter, hidden)] * 3
        return layers * sum(int(0.05 * out * inp) + 1 for out, inp in shapes)
    if method.startswith("spiel"):
        return int(0.002 * total_params)
    # 2 query heads (o columns) = 1 KV head (v rows), 8 channels (down columns, up rows)
    return layers * (2 * head_dim * hidden + 1 * head_dim * hidden + 2 * 8 * hidden)


@pytest.fixture(scope="module", params=LM_METHODS)
def lm_trained(request, contract: ModuleType, tiny_lm_dir: Path, tmp_path_factory) -> SimpleNamespace:
    method = request.param
    root = tmp_path_factory.mktemp(f"lm-{method}")
    pl.seed_everything(0, verbose=False)
    callback, optimizer = contract.build_method(method, **LM_OVERRIDES.get(method, {}))
    module = CausalLMModule(str(tiny_lm_dir), optimizer=optimizer)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, limit_val_batches=0, callbacks=[callback],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(root))
    trainer.fit(module, TokenRows())
    trainer.save_checkpoint(root / "last.ckpt")
    trainer.save_checkpoint(root / "weights.ckpt", weights_only=True)
    written = export_checkpoint(root / "last.ckpt", root / "export", merged=True)
    batch = {key: value[:4] for key, value in next(iter(TokenRows().train_dataloader())).items()}
    return SimpleNamespace(method=method, module=module.eval(), trainer=trainer, root=root, written=written,
                           batch=batch)


def lm_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_lm_merged_export_and_apply_delta(lm_trained, tiny_lm_dir: Path) -> None:
    merged = AutoModelForCausalLM.from_pretrained(lm_trained.written["merged"]).eval()
    expected, got = lm_logits(lm_trained.module.model, lm_trained.batch), lm_logits(merged, lm_trained.batch)
    assert_same_predictions(lm_trained.method, got, expected)
    base = apply_delta(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), lm_trained.written["delta"])
    reference = merged.state_dict()
    differ = [name for name, tensor in base.state_dict().items() if not torch.equal(tensor, reference[name])]
    assert not differ, f"{len(differ)} tensors differ from the merged model, e.g. {differ[:3]}"


def test_lm_load_from_checkpoint_round_trips(lm_trained) -> None:
    reloaded = CausalLMModule.load_from_checkpoint(lm_trained.root / "weights.ckpt", map_location="cpu").eval()
    expected = lm_logits(lm_trained.module.model, lm_trained.batch)
    assert torch.equal(lm_logits(reloaded.model, lm_trained.batch), expected)


def test_lm_trainable_count_is_the_method_budget(lm_trained) -> None:
    module = lm_trained.module
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert trainable and trainable == method_tensors(module)  # no new head: the deltas alone train
    total = sum(p.numel() for name, p in module.named_parameters() if not name.endswith(("delta_values", "delta_block")))
    assert module.trainable_parameters == lm_budget(lm_trained.method, module.model.config, total)
