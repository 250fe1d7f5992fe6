"""`prepare_model` decides what trains with no Trainer, and the module decides it through the same function: for every
method of the registry a plain model and a module under a Trainer train the same parameters; S2FT's removed
`strategy=` says its new name."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
from transformers import AutoModelForSequenceClassification

from sparse_lightning import S2FTStructureCallback, prepare_model
from sparse_lightning.modules import SequenceClassificationModule
from sparse_lightning.modules.prepare import method_from_name
from sparse_lightning.registry import METHODS
from sparse_lightning.sparse.frozen_delta import is_delta_parameter

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = {"s2ft": {"num_channels": 4, "train": ["down"]}, "lora": {"r": 2, "alpha": 4},
            **{name: {"density": 0.005} for name, row in METHODS.items() if row.element_sparse}}


def trainable(model) -> list[str]:
    return sorted(name for name, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("name", list(METHODS))
def test_a_plain_model_trains_what_the_module_trains(tiny_bert_cls_dir: Path, name: str) -> None:
    plain = prepare_model(AutoModelForSequenceClassification.from_pretrained(tiny_bert_cls_dir),
                          method_from_name(name, **SETTINGS.get(name, {})), heads=["classifier"])
    names = trainable(plain)
    row = METHODS[name]
    if row.sparse:  # the deltas and the head, nothing else
        assert {n for n in names if not n.startswith("classifier.")} == {n for n in names if is_delta_parameter(n)}
        assert any(is_delta_parameter(n) for n in names) and "classifier.weight" in names
    elif name == "lora":
        assert names and all("lora_" in n or ".classifier." in n for n in names)
    else:
        assert len(names) == len(list(plain.parameters()))

    module = SequenceClassificationModule(str(tiny_bert_cls_dir), num_labels=2,
                                          lora=SETTINGS["lora"] if name == "lora" else None)
    callback = method_from_name(name, **SETTINGS.get(name, {})) if row.sparse else None
    module.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                                callbacks=[callback] if callback else [])
    module.configure_model()
    assert trainable(module.model) == names


def test_a_name_takes_the_registry_defaults(tiny_bert_cls_dir: Path) -> None:
    model = prepare_model(AutoModelForSequenceClassification.from_pretrained(tiny_bert_cls_dir), "random_mask")
    assert any(is_delta_parameter(n) for n in trainable(model))
    with pytest.raises(ValueError, match="full takes no settings"):
        method_from_name("full", lr=1.0)


def test_s2ft_strategy_is_gone_and_says_its_new_name() -> None:
    with pytest.raises(TypeError, match=r"'strategy'; it is now select_by="):
        S2FTStructureCallback(strategy="random")
    with pytest.raises(TypeError, match=r"unexpected argument 'stratgy'$"):
        S2FTStructureCallback(stratgy="random")
