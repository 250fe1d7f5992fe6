"""Quantized frozen bases (nf4 / fp4 / int8 through bitsandbytes): every method trains its fp32 delta on them, the
base is never trained or re-quantized, checkpoints reload, and the merged export is a plain de-quantized model."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from transformers import AutoModelForSequenceClassification

pytest.importorskip("bitsandbytes")

from datamodules.glue import GLUEDataModule  # noqa: E402
from sparse_lightning import LoRASettings, SequenceClassificationModule  # noqa: E402
from sparse_lightning.export import export_checkpoint  # noqa: E402
from sparse_lightning.modules.base import count_parameters  # noqa: E402
from sparse_lightning.registry import names  # noqa: E402
from sparse_lightning.sparse import delta_layers  # noqa: E402
from sparse_lightning.sparse.quantized import FrozenWeightLinear, QuantizedLinear  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "sst2_tiny"
@pytest.mark.parametrize("kind, tolerance", [("nf4", 0.15), ("fp4", 0.2), ("int8", 0.02)])
def test_a_quantized_linear_computes_with_its_dequantized_weight(kind: str, tolerance: float) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = QuantizedLinear.from_linear(linear, kind)
    assert not list(p for p in layer.parameters() if p.requires_grad)
    assert layer.qweight.element_size() * layer.qweight.numel() <= linear.weight.numel()  # <= 1 byte per weight
    x = torch.randn(5, 64, requires_grad=True)
    out = layer(x)
    weight = layer.dense_weight()
    assert (weight - linear.weight).abs().max() < tolerance
    torch.testing.assert_close(out, nn.functional.linear(x, weight, linear.bias))
    out.square().sum().backward()
    reference = x.detach().clone().requires_grad_(True)
    nn.functional.linear(reference, weight, linear.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, reference.grad)


def test_the_frozen_weight_function_keeps_nothing_weight_sized_for_backward() -> None:
    calls = []

    def weight_fn() -> torch.Tensor:
        calls.append(1)
        return torch.ones(3, 4)

    x = torch.randn(2, 4, requires_grad=True)
    FrozenWeightLinear.apply(x, weight_fn, None).sum().backward()
    assert len(calls) == 2  # once in forward, once in backward: rebuilt, not saved


def fit(contract: ModuleType, model_dir: Path, root: Path, method: str, kind: str = "nf4"):
    """Four steps of the contract matrix's `method` (tests/distributed_scripts/contract_run.py) on a quantized base."""
    pl.seed_everything(0, verbose=False)
    callback, optimizer = contract.build_method(method)
    module = SequenceClassificationModule(str(model_dir), quantize=kind, optimizer=optimizer)
    data = GLUEDataModule(task="sst2", tokenizer_name_or_path=str(model_dir), train_file=str(DATA / "train.tsv"),
                          validation_files=[str(DATA / "dev.tsv")], batch_size=16, max_length=32)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, limit_val_batches=0, logger=False,
                         callbacks=[callback, ModelCheckpoint(dirpath=root, filename="last")],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root))
    trainer.fit(module, data)
    return module, data


@pytest.mark.parametrize("method", names(sparse=True))
def test_every_method_trains_on_an_nf4_base_and_exports_dequantized(method: str, contract: ModuleType,
                                                                    tiny_bert_dir: Path, tmp_path: Path) -> None:
    module, data = fit(contract, tiny_bert_dir, tmp_path, method)
    base = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).parameters())
    deltas = sum(p.numel() for name, p in module.named_parameters() if name.endswith(("values", "block")))
    assert count_parameters(module)[1] == base + deltas  # a packed weight counts its entries, not its bytes
    layers = delta_layers(module.model)
    assert layers and all(isinstance(layer.base, QuantizedLinear) for layer in layers.values())
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable)
    assert all(p.abs().max() > 0 for name, p in module.named_parameters() if name.endswith(("values", "block")))
    assert not any(isinstance(m, nn.Linear) and not m.weight.requires_grad and "classifier" not in name
                   for name, m in module.model.named_modules())  # every frozen Linear is stored quantized

    written = export_checkpoint(tmp_path / "last.ckpt", tmp_path / "out", merged=True)
    merged = AutoModelForSequenceClassification.from_pretrained(written["merged"]).eval()
    batch = next(iter(data.val_dataloader()))
    module.eval()
    with torch.no_grad():
        expected = module.model(**batch).logits
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=0, atol=1e-5)


def test_quantize_needs_a_frozen_base(tiny_bert_dir: Path, tmp_path: Path) -> None:
    module = SequenceClassificationModule(str(tiny_bert_dir), num_labels=2, quantize="nf4")
    module.trainer = pl.Trainer(accelerator="cpu", logger=False)
    with pytest.raises(ValueError, match="quantize='nf4' needs a frozen base: add a sparse method callback"):
        module.configure_model()
    with pytest.raises(ValueError, match=r"quantize must be one of \['nf4', 'fp4', 'int8'\]"):
        SequenceClassificationModule(str(tiny_bert_dir), quantize="int4")


def test_a_quantized_base_cannot_be_merged_in_place(contract: ModuleType, tiny_bert_dir: Path,
                                                     tmp_path: Path) -> None:
    module, _ = fit(contract, tiny_bert_dir, tmp_path, "sift", kind="int8")
    layer = next(iter(delta_layers(module.model).values()))
    with pytest.raises(ValueError, match="a quantized base cannot take a delta in place"):
        layer.merge()


class FixedBatchLoss(pl.Callback):
    """The loss of one fixed batch (eval mode) when training starts and ends: did the run learn?"""

    def __init__(self, batch: dict) -> None:
        self.batch, self.losses = batch, []

    @torch.no_grad()
    def record(self, module: SequenceClassificationModule) -> None:
        module.eval()
        self.losses.append(float(module.compute_loss(self.batch)))
        module.train()

    def on_train_start(self, trainer, module) -> None:
        self.record(module)

    def on_train_end(self, trainer, module) -> None:
        self.record(module)


def test_qlora_trains_lora_on_an_nf4_base_exports_merged_and_reloads(tiny_bert_dir: Path, tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    module = SequenceClassificationModule(str(tiny_bert_dir), quantize="nf4", lora=LoRASettings(r=4, alpha=8),
                                          optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    data = GLUEDataModule(task="sst2", tokenizer_name_or_path=str(tiny_bert_dir), train_file=str(DATA / "train.tsv"),
                          validation_files=[str(DATA / "dev.tsv")], batch_size=64, max_length=32)
    data.setup("fit")  # one batch holds the 64 training rows: the probe's loss is the training loss
    probe = FixedBatchLoss(next(iter(data.train_dataloader())))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=8, limit_val_batches=0, logger=False,
                         callbacks=[probe, ModelCheckpoint(dirpath=tmp_path, filename="last")],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, data)

    assert probe.losses[1] < probe.losses[0]
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    assert any("lora_A" in name for name in trainable) and any("classifier" in name for name in trainable)
    assert all("lora_" in name or "modules_to_save" in name for name in trainable)
    assert all(p.dtype == torch.float32 for p in module.parameters() if p.requires_grad)
    lora_layers = [m for m in module.model.modules() if hasattr(m, "lora_A")]
    assert lora_layers and all(isinstance(m.base_layer, QuantizedLinear) for m in lora_layers)
    frozen_dense = [name for name, m in module.model.named_modules()
                    if type(m) is nn.Linear and not m.weight.requires_grad]
    assert frozen_dense and all(".classifier." in name for name in frozen_dense)  # only the head's saved original

    batch = next(iter(data.val_dataloader()))
    module.eval()
    with torch.no_grad():
        expected = module.model(**batch).logits
    reloaded = SequenceClassificationModule.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True).eval()
    assert all(isinstance(m.base_layer, QuantizedLinear) for m in reloaded.model.modules() if hasattr(m, "lora_A"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(**batch).logits, expected, rtol=0, atol=0)

    written = export_checkpoint(tmp_path / "last.ckpt", tmp_path / "out", merged=True)
    merged = AutoModelForSequenceClassification.from_pretrained(written["merged"]).eval()
    assert not any(isinstance(m, QuantizedLinear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=0, atol=1e-5)


def test_qlora_on_a_causal_lm_keeps_the_tied_lm_head(tiny_lm_dir: Path) -> None:
    from sparse_lightning.modules import CausalLMModule

    module = CausalLMModule(str(tiny_lm_dir), quantize="nf4", lora=LoRASettings(r=2))
    module.trainer = pl.Trainer(accelerator="cpu", logger=False)
    module.configure_model()
    hf = module.model.base_model.model
    assert type(hf.lm_head) is nn.Linear and hf.lm_head.weight is hf.get_input_embeddings().weight  # still tied
    lora_layers = [m for m in module.model.modules() if hasattr(m, "lora_A")]
    assert lora_layers and all(isinstance(m.base_layer, QuantizedLinear) for m in lora_layers)
    ids = torch.randint(0, 256, (2, 8))
    module.model(input_ids=ids, labels=ids).loss.backward()
    assert all(m.lora_B["default"].weight.grad.abs().sum() > 0 for m in lora_layers)  # gradients reach LoRA


def test_quantizing_copies_the_kept_weights_out_of_the_checkpoint_mapping(tiny_lm_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from sparse_lightning.sparse.quantized import quantize_frozen_linears

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).requires_grad_(False)
    embedding = model.get_input_embeddings().weight
    before, values = embedding.data_ptr(), embedding.detach().clone()
    quantize_frozen_linears(model, "nf4", keep=("lm_head",))
    assert embedding.data_ptr() != before and torch.equal(embedding, values)  # own storage, same values
    assert model.get_input_embeddings().weight is embedding is model.lm_head.weight  # still one tied parameter
