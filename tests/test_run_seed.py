"""A random selection given no seed draws with the run's `seed_everything` value, so a seed study varies the
selection too (SpIEL's initial indices, the random mask, S2FT's random units); an explicit seed still wins."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from sparse_lightning.callbacks import PruneRegrowCallback, RandomMaskCallback, S2FTStructureCallback
from sparse_lightning.sparse import sparse_delta_layers


def element_indices(callback) -> list[list[int]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    callback.attach(model)
    return [sorted(layer.delta_indices.tolist()) for layer in sparse_delta_layers(model).values()]


def s2ft_channels(tiny_llama_dir: Path, callback) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    callback.attach(model)
    return sorted(model.model.layers[0].mlp.down_proj.delta_columns.tolist())


@pytest.mark.parametrize("make", [lambda **kw: PruneRegrowCallback(num_params=40, target_modules=["0", "1"], **kw),
                                  lambda **kw: RandomMaskCallback(density=0.1, target_modules=["0", "1"], **kw)], ids=["spiel", "random_mask"])
def test_element_selection_follows_the_run_seed(monkeypatch, make) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    default = make()
    assert element_indices(default) == element_indices(make(seed=7)) != element_indices(make(seed=0))
    assert default.describe()["seed"] == 7
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert element_indices(make()) == element_indices(make(seed=0))


def test_s2ft_random_selection_follows_the_run_seed(monkeypatch, tiny_llama_dir: Path) -> None:
    def make(**kw) -> S2FTStructureCallback:
        return S2FTStructureCallback(train=["down"], num_channels=6, **kw)

    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    picked = s2ft_channels(tiny_llama_dir, make())
    assert picked == s2ft_channels(tiny_llama_dir, make(seed=7)) != s2ft_channels(tiny_llama_dir, make(seed=0))
    assert make().describe()["seed"] == 7
