"""SIFT's global allocation (`GradientTopKCallback(allocation="global")`, sparse_lightning/methods/sift_global.py): one
budget over all target weights, the top-K |summed gradient| entries of all of them together, sized when the deltas
attach; and everything that consumes deltas (resume, reload, export, DDP) with the per-weight k it chose."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import ModuleType, SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from sparse_lightning.callbacks import GradientTopKCallback
from sparse_lightning.export import apply_delta, export_checkpoint
from sparse_lightning.methods import Calibration
from sparse_lightning.methods import sift_global
from sparse_lightning.methods.sift_global import RunningTopK, attach_by_global_gradient
from sparse_lightning.modules import SequenceClassificationModule
from sparse_lightning.scoring.row_sharded_sums import share_bytes
from sparse_lightning.scoring.score_groups import groups_within
from sparse_lightning.sparse import SparseDeltaLinear, sparse_delta_layers

VOCAB = 96
GLOBAL = {"allocation": "global"}


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(config).eval()


def make_batches(count: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(1, VOCAB, (4, 10), generator=generator),
             "labels": torch.randint(0, 2, (4,), generator=generator)} for _ in range(count)]


def brute_force(plain: nn.Module, targets: list[str], batches: list[dict], loss_fn, budget: int) -> dict[str, list]:
    """The top-`budget` of every target's dense |gradient summed over `batches`| at once, ties to the earlier target,
    then the lower position: each target's chosen positions (targets holding none left out)."""
    for batch in batches:
        loss_fn(plain, batch).backward()
    weights = [plain.get_submodule(name).weight for name in targets]
    scores = [(w.grad if w.grad is not None else torch.zeros_like(w)).abs().reshape(-1) for w in weights]
    best = torch.sort(torch.cat(scores), descending=True, stable=True).indices[:budget]
    chosen, start = {}, 0
    for name, score in zip(targets, scores):
        mine = best[(best >= start) & (best < start + score.numel())] - start
        if mine.numel():
            chosen[name] = sorted(mine.tolist())
        start += score.numel()
    return chosen


def hf_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


@pytest.mark.parametrize(("count", "score_memory"), [(1, 0.125), (3, 1.0), (3, 0.3)])
def test_the_selection_is_the_global_top_k_of_the_dense_summed_gradient(count: int, score_memory: float) -> None:
    """One batch (ranked inside backward), several all at once, and several in groups of weights: the same sets as
    a brute-force top-K over every target's dense summed gradient; the per-weight counts add up to the budget."""
    model = tiny_bert()
    callback = GradientTopKCallback(density=0.05, calibration_batches=count, score_memory=score_memory, **GLOBAL)
    targets = list(callback.target_linears(model))
    budget = sum(int(0.05 * model.get_submodule(name).weight.numel()) + 1 for name in targets)
    expected = brute_force(copy.deepcopy(model), targets, make_batches(count), hf_loss, budget)
    if score_memory < 1.0 and count > 1:  # several groups of weights, the batches re-run per group
        shares = {name: share_bytes(model.get_submodule(name).weight.shape, 1) for name in targets}
        assert len(groups_within(shares, score_memory)) > 1
    callback.attach(model, Calibration.from_batches(model, make_batches(count)))
    layers = sparse_delta_layers(model)
    assert sum(layer.k for layer in layers.values()) == budget
    assert {name: layer.delta_indices.tolist() for name, layer in layers.items()} == expected
    assert len(set(layer.k for layer in layers.values())) > 1  # the budget did move between weights
    for name in targets:
        layer = model.get_submodule(name)
        if name in expected:
            assert bool(layer.delta_selected) and not layer.delta_values.any()
        else:  # holds none of the K: no delta, a plain Linear
            assert type(layer) is nn.Linear
    assert not [name for name, p in model.named_parameters() if p.grad is not None]


class Twice(nn.Module):
    """`first` runs twice in one forward: its gradient arrives in two parts, and must be scored summed."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.unused = nn.Linear(6, 6), nn.Linear(6, 3), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(torch.tanh(self.first(x))))


@pytest.mark.parametrize("budget", [10, 60])
def test_a_weight_used_twice_or_never_is_scored_by_its_whole_sum(budget: int) -> None:
    """One batch: `first` is observed twice (its summed gradient counts, so it is scored again by summing) and
    `unused` never (its zero gradient loses every tie to the earlier weights' zeros, if it gets anything)."""
    torch.manual_seed(0)
    model = Twice()
    batch = {"x": torch.randn(5, 6)}

    def loss_fn(module: nn.Module, given: dict) -> torch.Tensor:
        return module(given["x"]).pow(2).sum()

    expected = brute_force(copy.deepcopy(model), ["first", "second", "unused"], [batch], loss_fn, budget)
    attach_by_global_gradient(model, ["first", "second", "unused"], [batch], lambda b: loss_fn(model, b), budget)
    layers = sparse_delta_layers(model)
    assert sum(layer.k for layer in layers.values()) == budget
    assert {name: layer.delta_indices.tolist() for name, layer in layers.items()} == expected
    assert ("unused" in layers) == (budget > 6 * 6 + 3 * 6)  # its zeros rank last


def test_the_running_merge_breaks_ties_by_weight_then_position() -> None:
    """Integer scores (ties everywhere), weights added in any order: the brute-force canonical top-K."""
    generator = torch.Generator().manual_seed(3)
    scores = {name: torch.randint(0, 4, (size,), generator=generator).float()
              for name, size in (("a", 7), ("b", 12), ("c", 5))}
    every = torch.cat(list(scores.values()))
    for k in (1, 6, 13, 24):
        best = torch.sort(every, descending=True, stable=True).indices[:k]
        for order in (["a", "b", "c"], ["c", "a", "b"], ["b", "c", "a"]):
            merge = RunningTopK(k, ["a", "b", "c"], largest_numel=12)
            for name in order:  # each weight's own canonical top-min(k, numel) candidates
                own = torch.sort(scores[name], descending=True, stable=True).indices[:k].sort().values
                merge.add(name, scores[name][own], own)
            got = torch.cat([positions + {"a": 0, "b": 7, "c": 19}[name]
                             for name, positions in merge.chosen().items()])
            assert got.tolist() == best.sort().values.tolist(), (k, order)


def test_bad_settings_are_refused_naming_the_flag() -> None:
    with pytest.raises(ValueError, match=r"allocation must be one of \['per_weight', 'global'\].*got 'uniform'"):
        GradientTopKCallback(allocation="uniform")
    from lightning.pytorch.strategies import ModelParallelStrategy

    callback = GradientTopKCallback(**GLOBAL)
    with pytest.raises(ValueError, match=r'allocation="global" is not supported under FSDP2.*allocation="per_weight"'):
        callback.setup(SimpleNamespace(strategy=ModelParallelStrategy()), SimpleNamespace(hparams={}), "fit")
    with pytest.raises(ValueError, match=r'allocation="global" is not supported with model.quantize'):
        callback.setup(SimpleNamespace(strategy=None), SimpleNamespace(hparams={"quantize": "nf4"}), "fit")
    with pytest.raises(ValueError, match=r'allocation="global" needs calibration batches'):
        callback.attach(tiny_bert())
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"the global budget must be between 1 and"):  # and nothing is left attached
        attach_by_global_gradient(model, list(callback.target_linears(model)), make_batches(1),
                                  lambda batch: hf_loss(model, batch), budget=10**9)
    assert not sparse_delta_layers(model)
    assert GradientTopKCallback().describe() == {"method": "sift", "density": 0.01, "calibration_batches": 1}
    assert callback.describe()["allocation"] == "global"
    assert GradientTopKCallback().attaches_from_shapes and not callback.attaches_from_shapes


@pytest.fixture(scope="module")
def trained(contract: ModuleType, tiny_bert_cls_dir: Path, tmp_path_factory) -> SimpleNamespace:
    """The contract's SIFT run (density 0.05, 2 calibration batches) with the global allocation, uninterrupted."""
    root = tmp_path_factory.mktemp("sift-global")
    module, trainer = contract.run(tiny_bert_cls_dir, root / "full", "sift", overrides=GLOBAL)
    return SimpleNamespace(module=module, trainer=trainer, root=root, checkpoints=root / "full")


def test_a_fit_trains_exactly_the_budget_over_the_chosen_weights(trained, tiny_bert_cls_dir: Path) -> None:
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_cls_dir)
    targets = list(GradientTopKCallback().target_linears(base))
    budget = sum(int(0.05 * base.get_submodule(name).weight.numel()) + 1 for name in targets)
    layers = sparse_delta_layers(trained.module.model)
    assert sum(layer.k for layer in layers.values()) == budget
    trainable = {name for name, p in trained.module.named_parameters() if p.requires_grad}
    assert trainable == {f"model.{name}.delta_values" for name in layers} | {"model.classifier.weight",
                                                                            "model.classifier.bias"}
    info = torch.load(trained.checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["sparse_lightning"]
    assert info["callbacks"] == [{"method": "sift", "density": 0.05, "calibration_batches": 2, "allocation": "global"}]


def test_resume_rebuilds_the_recorded_sizes_and_retraces_the_run(trained, contract: ModuleType,
                                                                tiny_bert_cls_dir: Path, monkeypatch) -> None:
    """Resumed with other calibration batches (1 instead of 2), whose selection sizes the weights otherwise: the run
    takes the checkpoint's sizes and indices, and ends bit for bit where the uninterrupted run ended."""
    chosen_now = []
    original = sift_global.attach_by_global_gradient

    def recording(*args, **kwargs):
        layers = original(*args, **kwargs)
        chosen_now.append({name: layer.k for name, layer in layers.items()})
        return layers

    monkeypatch.setattr("sparse_lightning.callbacks.sift.attach_by_global_gradient", recording)
    module, trainer = contract.run(tiny_bert_cls_dir, trained.root / "resumed", "sift",
                                   resume=trained.checkpoints / f"step={contract.CHECKPOINT_STEP}.ckpt",
                                   overrides={**GLOBAL, "calibration_batches": 1})
    assert trainer.global_step == contract.STEPS
    recorded = {name: layer.k for name, layer in sparse_delta_layers(trained.module.model).items()}
    assert chosen_now and chosen_now[0] != recorded  # this run's own calibration would size them otherwise
    assert {name: layer.k for name, layer in sparse_delta_layers(module.model).items()} == recorded
    expected, got = trained.module.model.state_dict(), module.model.state_dict()
    assert got.keys() == expected.keys()
    assert [name for name, tensor in expected.items() if not torch.equal(got[name], tensor)] == []
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.parameters() if p.requires_grad}  # the rebuilt deltas, not stale ones


def test_reload_validate_and_export_use_the_recorded_sizes(trained, contract: ModuleType, tiny_bert_cls_dir: Path,
                                                          glue_datamodule, tmp_path: Path) -> None:
    datamodule = glue_datamodule(tiny_bert_cls_dir)
    datamodule.setup("validate")
    batch = next(iter(datamodule.val_dataloader()))
    module = trained.module.eval()
    with torch.no_grad():
        expected = module(batch).logits
    reloaded = SequenceClassificationModule.load_from_checkpoint(trained.checkpoints / "weights.ckpt",
                                                                 map_location="cpu").eval()
    assert [n for n, t in module.model.state_dict().items() if not torch.equal(reloaded.model.state_dict()[n], t)] == []
    with torch.no_grad():
        assert torch.equal(reloaded(batch).logits, expected)

    callback, _ = contract.build_method("sift", **GLOBAL)  # validate with the method on the trainer: nothing selects
    fresh = SequenceClassificationModule(str(tiny_bert_cls_dir))
    trainer = pl.Trainer(accelerator="cpu", devices=1, callbacks=[callback], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.validate(fresh, glue_datamodule(tiny_bert_cls_dir), ckpt_path=trained.checkpoints / "last.ckpt",
                     verbose=False)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(batch).logits, expected)

    written = export_checkpoint(trained.checkpoints / "last.ckpt", tmp_path / "export", merged=True)
    merged = AutoModelForSequenceClassification.from_pretrained(written["merged"]).eval()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_cls_dir).eval()
    apply_delta(base, written["delta"])
    with torch.no_grad():
        assert torch.equal(merged(**batch).logits, expected)
        assert torch.equal(base(**batch).logits, expected)
    config = json.loads((written["delta"] / "delta_config.json").read_text())
    assert {name: target["k"] for name, target in config["targets"].items()} == {
        name: layer.k for name, layer in sparse_delta_layers(module.model).items()}

    adapter = export_checkpoint(trained.checkpoints / "last.ckpt", tmp_path / "peft", format="peft-supertuning")
    peft_model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_bert_cls_dir),
                                           adapter["peft"]).eval()
    with torch.no_grad():
        assert torch.equal(peft_model(**batch).logits, expected)


@pytest.mark.multiprocess
def test_ddp_ranks_agree_and_resume_exactly(contract: ModuleType, tiny_bert_cls_dir: Path, launch_ranks,
                                            tmp_path: Path) -> None:
    """2 CPU ranks under DDP: both choose the same sizes and indices in `configure_model` and train the same deltas;
    the run resumed from its mid-epoch checkpoint ends bit for bit where it ended."""
    launch_ranks(Path(contract.__file__), ["--method", "sift", "--model_dir", str(tiny_bert_cls_dir), "--output",
                                           str(tmp_path), "--strategies", "ddp", "--resume", "ddp", "--devices", "2",
                                           "--batch_size", "4", "--overrides", json.dumps(GLOBAL)],
                 "the global SIFT DDP runs", 400)
    runs = {run: [torch.load(tmp_path / run / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
            for run in ("ddp", "ddp-resumed")}
    first = runs["ddp"][0]
    indices = {name: t for name, t in first["buffers"].items() if name.endswith("delta_indices")}
    assert indices and 0 < len(indices) <= 8
    budget = sum(t.numel() for t in indices.values())
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_cls_dir)
    assert budget == sum(int(0.05 * base.get_submodule(name).weight.numel()) + 1
                         for name in GradientTopKCallback().target_linears(base))
    for result in [runs["ddp"][1], *runs["ddp-resumed"]]:
        assert result["buffers"].keys() == first["buffers"].keys()
        assert all(torch.equal(result["buffers"][name], t) for name, t in first["buffers"].items())
        assert result["trained"].keys() == first["trained"].keys()
        assert all(torch.equal(result["trained"][name], t) for name, t in first["trained"].items())


def test_resizing_takes_the_checkpoints_sizes() -> None:
    """What `resize_deltas_as_recorded` builds: the checkpoint's k, a plain Linear where it has none."""
    from sparse_lightning.sparse.inject import attach_deltas_from_state_dict, resize_deltas_as_recorded

    model = tiny_bert()
    names = list(GradientTopKCallback().target_linears(model))
    GradientTopKCallback(density=0.05).attach(model)
    recorded = {f"{names[0]}.delta_values": torch.zeros(3), f"{names[1]}.delta_values": torch.zeros(5)}
    resize_deltas_as_recorded(model, recorded)
    attach_deltas_from_state_dict(model, recorded)
    layers = sparse_delta_layers(model)
    assert {name: layer.k for name, layer in layers.items()} == {names[0]: 3, names[1]: 5}
    assert all(isinstance(model.get_submodule(name), nn.Linear) for name in names[2:])
    assert all(isinstance(layer, SparseDeltaLinear) for layer in layers.values())
