"""Optimizer parameter groups: a method's deltas at the optimizer's learning rate and, optionally, the modules
trained densely beside them (the task head, the pooler) at a learning rate of their own (`head_lr`).

Why: a sparse or LoRA delta moves a few entries of a pretrained weight, while the head is a whole dense matrix
(the classifier starts from scratch); one Adam learning rate tuned for the deltas can be the wrong one for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from sparse_lightning.sparse.frozen_delta import is_delta_parameter


def is_method_delta(name: str) -> bool:
    """A sparse method's trainable values or a PEFT LoRA factor (`lora_A`, `lora_B`, ...)."""
    return is_delta_parameter(name) or ".lora_" in f".{name}"


def parameter_groups(named: Iterable[tuple[str, nn.Parameter]], head_lr: float | None) -> list[Any]:
    """The trainable parameters as the optimizer takes them: one plain list when `head_lr` is None, else two
    groups, the deltas (the optimizer's lr) and every other trainable parameter (`lr=head_lr`)."""
    named = [(n, p) for n, p in named if p.requires_grad]
    if head_lr is None:
        return [p for _, p in named]
    deltas = [p for n, p in named if is_method_delta(n)]
    dense = [p for n, p in named if not is_method_delta(n)]
    if not deltas or not dense:
        what = "no sparse or LoRA delta trains (full fine-tuning)" if not deltas else "nothing trains densely"
        raise ValueError(f"model.init_args.head_lr={head_lr} needs deltas and dense modules side by side, but "
                         f"{what}: unset head_lr, or give the method dense_modules (LoRA: modules_to_save)")
    return [{"params": deltas}, {"params": dense, "lr": head_lr}]
