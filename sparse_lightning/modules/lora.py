"""The LoRA baseline through PEFT, in the same harness, so every comparison is one config away."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class LoRASettings:
    """PEFT `LoraConfig` fields that matter for a matched comparison.

    Args:
        r: the adapter rank.
        alpha: LoRA's scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapter input.
        target_modules: module-name patterns; default: the architecture's default targets.
        modules_to_save: modules trained densely beside the adapters (PEFT's `modules_to_save`); default: the
            task head. E.g. `[classifier, pooler]` gives LoRA the dense pooler the sparse recipes train.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None
    modules_to_save: list[str] | None = None


def apply_lora(model: nn.Module, settings: LoRASettings, target_modules: list[str], modules_to_save: list[str]) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError("the LoRA baseline needs PEFT: pip install 'sparse-lightning[lora]'") from error
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.target_modules or target_modules,
                        modules_to_save=modules_to_save or None)
    return get_peft_model(model, config)
