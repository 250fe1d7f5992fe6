"""`init_delta` on a base loaded by shards: each rank adds the delta's entries that fall in its own rows.

`apply_delta` checks the whole delta against the meta model (names, shapes, index ranges, finite values: everything
but base + delta, whose base values are not read yet) and hands each update of a meta weight to the shard loader
(`ShardedLoad.defer`), which keeps it as flat row-major entries in the weight's original layout (an S2FT block as
its entries; a dense replacement whole, as the delta file holds it). When `load_shards` has read a rank's rows
(S2FT's co-permuted rows and columns included) it adds the entries those rows hold, mapped through the same order,
summed in fp32 and rounded once as `apply_delta` adds them, after checking base + delta finite in the weight's dtype;
the ranks agree on any such failure before one of them raises, so none waits on the others. A weight read whole
before sharding (S2FT's weight norms, a Super-Tuning adapter without saved indices) gets every entry added.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sparse_lightning.borders.checks import (
    DeltaFileError,
    add_rounding_once,
    overflowing,
)


@dataclass
class RowUpdate:
    """One update of a weight still on the meta device: `values` at flat row-major `flat` positions of the original
    layout, or (flat None) the weight's whole new value; `file` is the delta file it came from and `dtype` the
    weight's (both named in errors)."""

    flat: Tensor | None
    values: Tensor
    file: Path
    dtype: torch.dtype


def as_entries(weight: Tensor, dim: int | None, index: Tensor | None, delta: Tensor, file: Path) -> RowUpdate:
    """`apply_delta`'s (dim, index, delta) update of `weight` as flat entries: -1 is already flat; an S2FT block on
    `index` rows (dim 0) or columns (dim 1) becomes its entries; None replaces the whole weight."""
    if dim is None:
        return RowUpdate(None, delta, file, weight.dtype)
    index = index.long()
    if dim == -1:
        return RowUpdate(index, delta.reshape(-1), file, weight.dtype)
    width = int(weight.shape[1:].numel())
    if dim == 0:
        flat = index.unsqueeze(1) * width + torch.arange(width).unsqueeze(0)
    else:
        flat = torch.arange(weight.shape[0]).unsqueeze(1) * width + index.unsqueeze(0)
    return RowUpdate(flat.reshape(-1), delta.reshape(-1), file, weight.dtype)


def add_whole(tensor: Tensor, updates: list[RowUpdate]) -> None:
    """Every update onto a whole weight (read before sharding), in order."""
    for update in updates:
        if update.flat is None:
            tensor.copy_(update.values)
        else:
            add_rounding_once(tensor, -1, update.flat, update.values)


@torch.no_grad()
def add_to_rows(local: Tensor, updates: list[RowUpdate], rows: Tensor | None, columns: Tensor | None,
                shape: torch.Size) -> tuple[int, int] | None:
    """Add the updates' entries that fall in this rank's rows onto `local`, in order: local row i holds original row
    `rows[i]` (and original column `columns[j]` at column j, when given). Returns (position in `updates`, entries
    that would become non-finite) of the first update that would overflow the weight's dtype, leaving it and the
    rest unapplied; None when all were added."""
    if local.dim() == 0:  # a scalar parameter: one row of one entry
        local, shape, rows = local.view(1), torch.Size([1]), torch.zeros(1, dtype=torch.long)
    rows, columns = rows.cpu(), None if columns is None else columns.cpu()  # positions: worked out on the host
    width = int(shape[1:].numel())
    local_row = torch.full((shape[0],), -1, dtype=torch.long)  # original row -> this rank's row (-1: another rank's)
    local_row[rows] = torch.arange(rows.numel())
    local_column = None
    if columns is not None:
        local_column = torch.empty(shape[1], dtype=torch.long)
        local_column[columns] = torch.arange(columns.numel())
    for position, update in enumerate(updates):
        if update.flat is None:
            value = update.values.reshape(shape).index_select(0, rows)
            if columns is not None:
                value = value.index_select(1, columns)
            bad = overflowing(local, None, None, value)
            if bad:
                return position, bad
            local.copy_(value)
            continue
        row = local_row[update.flat // width]
        mine = row >= 0
        within = update.flat[mine] % width
        if local_column is not None:
            within = local_column[within]
        flat, values = row[mine] * width + within, update.values[mine]
        bad = overflowing(local, -1, flat, values)
        if bad:
            return position, bad
        add_rounding_once(local, -1, flat, values)
    return None


def agree_on_overflow(failure: tuple[int, int] | None, names: list[tuple[str, RowUpdate]],
                      device: torch.device) -> None:
    """Every rank raises the same `DeltaFileError` when any rank's rows overflowed (`failure`: its position in
    `names`, a list the same on every rank, and the count), so none waits on the others in a later collective."""
    code = failure[0] if failure is not None else len(names)
    count = failure[1] if failure is not None else 0
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        agreed = torch.tensor([code], device=device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
        mine = torch.tensor([count if code == int(agreed) else 0], device=device)
        torch.distributed.all_reduce(mine)
        code, count = int(agreed), int(mine)
    if code < len(names):
        key, update = names[code]
        raise DeltaFileError(f"{update.file}: adding it would make {count} entries of {key} non-finite in "
                             f"{str(update.dtype).removeprefix('torch.')} (values too large for that dtype); every rank "
                             "stopped loading by shards")
