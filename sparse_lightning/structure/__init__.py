"""Coupled structures per architecture family: heads (with KV groups), FFN channels, co-permutations."""

from sparse_lightning.structure.families import FAMILIES, CoupledGroup, find_groups
from sparse_lightning.structure.permute import permute_group, restore_original_layout, order_buffer
from sparse_lightning.structure.select import allocate_global, choose_units, selection_order

__all__ = [
    "FAMILIES",
    "CoupledGroup",
    "allocate_global",
    "choose_units",
    "find_groups",
    "permute_group",
    "restore_original_layout",
    "order_buffer",
    "selection_order",
]
