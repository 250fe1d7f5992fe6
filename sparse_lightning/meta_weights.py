"""Values for weights still on the meta device, read a group at a time.

A model built to be loaded by shards under FSDP2 (`modules/sharded_loading.py`) registers how to read any of its
weights from its checkpoint. A choice made before sharding that needs a few weights' values (S2FT's weight norms)
then reads one group of weights, uses it and drops it, instead of every rank loading the whole model first.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn

#: (module, parameter name) -> the parameter's whole checkpoint tensor, or None when the checkpoint lacks it.
Reader = Callable[[nn.Module, str], "Tensor | None"]
_READERS: weakref.WeakKeyDictionary[nn.Module, Reader] = weakref.WeakKeyDictionary()


def register_reader(model: nn.Module, reader: Reader) -> None:
    _READERS[model] = reader


@contextmanager
def whole_weights(model: nn.Module, modules: Iterable[nn.Module]) -> Iterator[None]:
    """Inside, each meta parameter of `modules` (parts of `model`) holds its whole checkpoint tensor in its own dtype;
    after, the meta parameter again (the same object: the shard loader and FSDP2 still find it)."""
    reader = _READERS.get(model)
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module in modules:
            for name, param in list(module.named_parameters(recurse=False)):
                if not param.is_meta:
                    continue
                value = reader(module, name) if reader is not None else None
                if value is None:
                    raise RuntimeError(f"{type(module).__name__}.{name} is on the meta device with no checkpoint tensor "
                                       "to read its values from: build the model with sharded_loading.build_on_meta")
                module._parameters[name] = nn.Parameter(value.to(param.dtype), requires_grad=param.requires_grad)
                swapped.append((module, name, param))
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param
