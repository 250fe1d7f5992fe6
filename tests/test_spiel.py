"""PruneRegrowCallback (SpIEL): the schedule, drop and grow on constructed examples, optimizer-state seeding,
SM3, and whole runs on tiny BERT (AG and MA) whose index sets stay unique and constant in size."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from sparse_lightning.callbacks import PruneRegrowCallback
from sparse_lightning.methods.reselection_schedule import ReselectionSchedule
from sparse_lightning.modules import SequenceClassificationModule
from sparse_lightning.sparse import sparse_delta_layers
from sparse_lightning.sparse.optim import SM3, seed_slots_

# -- schedule -----------------------------------------------------------------------------------------

def test_schedule_reproduces_the_published_fraction_sequence():
    schedule = ReselectionSchedule(interval=20, accumulation_steps=5, regrow_fraction=0.2, until=100)
    reselections = [step for step in range(200) if schedule.reselects_at(step)]
    assert reselections == [5, 25, 45, 65, 85]
    assert [step for step in range(200) if schedule.window_starts_at(step)] == [0, 20, 40, 60, 80]
    assert [step for step in range(30) if schedule.in_window(step)] == [0, 1, 2, 3, 4, 20, 21, 22, 23, 24]
    fractions = [schedule.fraction_at(step) for step in reselections]
    assert fractions == pytest.approx([1.0, 0.2 * 0.75, 0.2 * 0.55, 0.2 * 0.35, 0.2 * 0.15])


def test_cosine_schedule_decays_to_zero():
    schedule = ReselectionSchedule(interval=10, accumulation_steps=2, regrow_fraction=0.5, until=100, decay="cosine")
    assert schedule.fraction_at(2) == 1.0
    assert schedule.fraction_at(52) == pytest.approx(0.5 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 0.52)).item()))
    assert schedule.fraction_at(100) == pytest.approx(0.0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"reselection_interval": 5, "accumulation_steps": 5}, "must be larger than accumulation_steps"),
    ({"regrow_fraction": 0.0}, r"regrow_fraction must be in \(0, 1\]"),
    ({"regrow_fraction": 1.5}, r"regrow_fraction must be in \(0, 1\]"),
    ({"regrowth": "magnitude"}, "regrowth must be 'gradient'"),
    ({"density": 0.0}, r"density must be in \(0, 1\]"),
])
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruneRegrowCallback(**kwargs)


def test_budget_larger_than_the_targets_names_the_valid_density():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 100))  # targets hold 12 of 415 parameters
    with pytest.raises(ValueError, match=r"use density <= 0\.0289"):
        PruneRegrowCallback(density=0.5, target_modules=["0"]).attach(model)


# -- drop and grow on a constructed layer --------------------------------------------------------------

def constructed(regrowth: str = "gradient", k: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    callback = PruneRegrowCallback(num_params=k, target_modules=["0"], regrowth=regrowth, reselection_interval=4,
                                   accumulation_steps=2, regrow_fraction=0.8, reselection_until=1000)
    callback.attach(model)
    layer = sparse_delta_layers(model)["0"]
    return model, callback, layer


def window(callback: PruneRegrowCallback, layer, grads: list[torch.Tensor]) -> None:
    """Feed a window's dense weight gradients through the observer, as backward would."""
    callback.cycle._stats = {}
    observe = callback.cycle._observer("0", layer)
    for grad in grads:
        observe(grad)


def test_initial_indices_are_random_unique_and_seeded():
    _, _, first = constructed(k=5, seed=0)
    _, _, again = constructed(k=5, seed=1)  # the callback's seed, not torch's global RNG, decides
    assert torch.equal(first.delta_indices, again.delta_indices)
    assert first.delta_indices.unique().numel() == 5


def test_regrowth_takes_largest_accumulated_gradients_and_seeds_adam():
    model, callback, layer = constructed()
    optimizer = torch.optim.AdamW([layer.delta_values], lr=0.1, betas=(0.9, 0.99))

    # First reselection: every slot moves to the top-|accumulated gradient| candidates of the first micro-batch.
    g1 = torch.tensor([[5.0, 0, 0, 0], [0, -4.0, 0, 0], [0, 0, 3.0, 0.1]])
    window(callback, layer, [g1, g1])
    callback.cycle.reselect({"0": layer}, 2, optimizer)
    assert sorted(layer.delta_indices.tolist()) == [0, 5, 10]
    assert callback.history[0]["replaced"] == {"0": 3}

    for _ in range(3):  # some Adam steps, so that the step count t is 3
        layer.delta_values.grad = torch.ones(3)
        optimizer.step()
    with torch.no_grad():
        layer.delta_values.copy_(torch.tensor([0.5, -0.01, 0.02])[layer.delta_indices.argsort().argsort()])
    keep_slot = int((layer.delta_values.abs() == 0.5).nonzero())
    kept_state = optimizer.state[layer.delta_values]["exp_avg"][keep_slot].clone()

    # Second window: candidates are the first micro-batch's top-3 |gradient| among inactive entries (1, 2, 3);
    # the sum over the window ranks them 3 > 1 > 2, so the two dropped slots (|delta| 0.01, 0.02) regrow at 3 and 1.
    m1 = torch.zeros(3, 4)
    m1.view(-1)[[1, 2, 3]] = torch.tensor([2.0, 1.9, 1.8])
    m1.view(-1)[0] = 100.0  # active: never a candidate
    m2 = torch.zeros(3, 4)
    m2.view(-1)[[1, 2, 3, 4]] = torch.tensor([0.5, -1.5, 4.0, 50.0])  # entry 4 was not a candidate
    window(callback, layer, [m1, m2])
    callback.cycle.reselect({"0": layer}, 6, optimizer)
    assert callback.history[1]["fraction"] == pytest.approx(0.8 * (1 - 6 / 1000))
    assert sorted(layer.delta_indices.tolist()) == [0, 1, 3]
    assert layer.delta_values[keep_slot] == 0.5 and int(layer.delta_indices[keep_slot]) == 0

    state = optimizer.state[layer.delta_values]
    t = float(state["step"])
    for position, grads in ((3, [1.8, 4.0]), (1, [2.0, 0.5])):
        slot = int((layer.delta_indices == position).nonzero())
        mean = sum(grads) / 2
        mean_sq = sum(g * g for g in grads) / 2
        assert layer.delta_values[slot] == 0.0
        assert state["exp_avg"][slot] / (1 - 0.9**t) == pytest.approx(mean)
        assert state["exp_avg_sq"][slot] / (1 - 0.99**t) == pytest.approx(mean_sq)
    assert state["exp_avg"][keep_slot] == kept_state


def test_statistics_stay_fp32_for_bf16_gradients():
    _, callback, layer = constructed()
    grads = [torch.randn(3, 4).bfloat16() for _ in range(300)]  # a bf16 counter would stop at 256
    window(callback, layer, grads)
    stats = callback.cycle._stats["0"]
    assert stats["sum"].dtype == stats["square_sum"].dtype == torch.float32
    assert int(stats["count"]) == 300


def test_seeding_resets_other_optimizers_state():
    param = nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    param.grad = torch.ones(4)
    optimizer.step()
    seed_slots_(optimizer, param, torch.tensor([1, 3]), torch.tensor([5.0, 5.0]), torch.tensor([25.0, 25.0]))
    assert optimizer.state[param]["momentum_buffer"].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_sm3_keeps_row_and_column_maxima_and_momentum_regrowth_uses_them():
    model, callback, layer = constructed(regrowth="momentum")
    with torch.no_grad():
        layer.delta_indices.copy_(torch.tensor([0, 6, 11]))  # (0, 0), (1, 2), (2, 3)
    optimizer = SM3([layer.delta_values], lr=0.1, momentum=0.0)
    optimizer.cover_delta(layer.delta_values, layer.delta_indices, (3, 4))
    layer.delta_values.grad = torch.tensor([1.0, -3.0, 2.0])
    optimizer.step()
    row, col = optimizer.accumulators(layer.delta_values)
    assert row.tolist() == [1.0, 9.0, 4.0] and col.tolist() == [1.0, 0.0, 9.0, 4.0]
    assert layer.delta_values.tolist() == pytest.approx([-0.1, 0.1, -0.1])  # g / sqrt(g^2): sign steps
    assert sum(s.numel() for s in optimizer.state[layer.delta_values].values()) == 3 + 4 + 3  # rows, columns, momentum

    # Every slot moves on the first reselection: the three largest row x column products among all entries.
    callback.cycle.reselect({"0": layer}, 2, optimizer)
    assert sorted(layer.delta_indices.tolist()) == [6, 7, 10]  # (1,2)=81, (1,3)=36, (2,2)=36 beat (2,3)=16
    assert layer.delta_values.tolist() == [0.0, 0.0, 0.0]


# -- whole runs on tiny BERT ---------------------------------------------------------------------------

class IndexLog(pl.Callback):
    """Put after the SpIEL callback: the index set of every weight before each optimizer step."""

    def __init__(self) -> None:
        self.sets: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sets.append({n: l.delta_indices.clone() for n, l in sparse_delta_layers(pl_module).items()})


def fit_spiel(datamodule, model_dir: Path, root: Path, callback: PruneRegrowCallback, optimizer, max_steps: int,
              accumulate: int = 1) -> tuple[SequenceClassificationModule, IndexLog]:
    """`datamodule`: the conftest's `glue_datamodule` factory (batches of 8)."""
    pl.seed_everything(0, verbose=False)
    module = SequenceClassificationModule(str(model_dir), optimizer=optimizer)
    log = IndexLog()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, limit_val_batches=0,
                         callbacks=[callback, log], accumulate_grad_batches=accumulate, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(root))
    trainer.fit(module, datamodule(model_dir, batch_size=8))
    return module, log


@pytest.mark.parametrize(("regrowth", "optimizer", "accumulate"), [
    ("gradient", lambda params: torch.optim.AdamW(params, lr=1e-2), 1),
    ("gradient", lambda params: torch.optim.AdamW(params, lr=1e-2), 2),
    ("momentum", lambda params: SM3(params, lr=1e-2), 1),
])
def test_runs_keep_indices_unique_and_counts_constant(glue_datamodule, tiny_bert_dir, tmp_path, regrowth, optimizer,
                                                     accumulate):
    callback = PruneRegrowCallback(density=0.002, regrowth=regrowth, reselection_interval=3, accumulation_steps=1,
                                   regrow_fraction=0.5, plot_path=str(tmp_path / "indices.png"))
    module, log = fit_spiel(glue_datamodule, tiny_bert_dir, tmp_path, callback, optimizer, max_steps=8,
                            accumulate=accumulate)
    assert [record["step"] for record in callback.history] == [1, 4, 7]
    assert [record["fraction"] for record in callback.history] == pytest.approx([1.0, 0.5 * (1 - 4 / 8), 0.5 * (1 - 7 / 8)])
    layers = sparse_delta_layers(module)
    ks = {name: layer.k for name, layer in layers.items()}
    total = sum(p.numel() for n, p in module.model.named_parameters() if "delta_values" not in n)
    assert sum(ks.values()) == int(0.002 * total)  # SpIEL's budget: a fraction of all the model's parameters
    for indices in log.sets:
        for name, idx in indices.items():
            assert idx.numel() == ks[name] and idx.unique().numel() == ks[name]
    # the first reselection replaced the random start everywhere; later ones moved about the scheduled fraction
    start, after_first = log.sets[0], log.sets[2]
    for name in ks:
        assert not torch.isin(after_first[name], start[name]).all()
        moved = (~torch.isin(log.sets[5][name], log.sets[4][name])).sum().item()
        assert moved <= round(0.25 * ks[name])
    assert (tmp_path / "indices.png").stat().st_size > 10_000


def test_momentum_regrowth_needs_sm3(glue_datamodule, tiny_bert_dir, tmp_path):
    callback = PruneRegrowCallback(density=0.002, regrowth="momentum")
    with pytest.raises(ValueError, match="sparse_lightning.sparse.optim.SM3"):
        fit_spiel(glue_datamodule, tiny_bert_dir, tmp_path, callback, lambda params: torch.optim.AdamW(params),
                  max_steps=1)

