"""The LoRA baseline through PEFT, in the same harness, so every comparison is one config away."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


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
    """PEFT's LoRA model. On a base built on the meta device (loaded by shards under FSDP2) the adapters keep the
    values PEFT draws for them, on the default device: the same draws a whole-model load makes."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError("the LoRA baseline needs PEFT: pip install 'sparse-lightning[lora]'") from error
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.target_modules or target_modules,
                        modules_to_save=modules_to_save or None)
    on_meta = any(p.is_meta for p in model.parameters())
    with _AdaptersStayReal() if on_meta else nullcontext():
        return get_peft_model(model, config)


class _AdaptersStayReal(TorchFunctionMode):
    """Inside, `tensor.to(meta)` of a real tensor applies only its dtype: PEFT moves each new adapter to its base
    layer's device (and dtype), which for a meta base would discard the A and B matrices it has just drawn."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.to and not args[0].is_meta:
            device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            if device is not None and device.type == "meta":
                return args[0] if dtype is None else func(args[0], dtype)
        return func(*args, **kwargs)


def saved_module_copies(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(original, PEFT's trained copy) for every module of LoRA's `modules_to_save`: a copy of a module still on the
    meta device reads the original's checkpoint tensors when the base is loaded by shards."""
    from peft.utils.other import ModulesToSaveWrapper

    return [(original, copy) for wrapper in model.modules() if isinstance(wrapper, ModulesToSaveWrapper)
            for copy in wrapper.modules_to_save.values()
            for original, copy in zip(wrapper.original_module.modules(), copy.modules())]
