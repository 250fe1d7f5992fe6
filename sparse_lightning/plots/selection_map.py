"""S2FT's selection map: which attention heads and FFN channels train in each layer (layers x units, one
heatmap per kind), read from a model carrying S2FT's block layers (a loaded checkpoint, or a model after
`S2FT.attach`) or from the JSON file `save_selection` writes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparse_lightning.borders.models import resolve_model_path
from sparse_lightning.methods.s2ft import SELECTION_FORMAT
from sparse_lightning.plots.pyplot import pyplot, save
from sparse_lightning.sparse.block import block_delta_layers
from sparse_lightning.structure.families import KV_ROLES, CoupledGroup, find_groups

UNIT_NAMES = {"heads": "query head", "channels": "FFN channel"}
#: Wider maps are drawn as the share selected per bin of units, so no selected unit falls between pixels.
MAX_COLUMNS = 1600


def _stack(groups: list[CoupledGroup], masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """{kind: layers x units bool} for the kinds with at least one selected unit."""
    out = {}
    for kind in ("heads", "channels"):
        of_kind = [g for g in groups if g.kind == kind]
        if of_kind and any(g.owner in masks for g in of_kind):
            out[kind] = torch.stack([masks.get(g.owner, torch.zeros(g.num_units, dtype=torch.bool)) for g in of_kind])
    return out


def selection_matrices(model: nn.Module) -> dict[str, Tensor]:
    """{"heads" | "channels": layers x units bool}: the units (original numbering) S2FT's blocks train, read
    from the blocks' original-layout positions (o/down preferred; v/up/gate otherwise)."""
    blocks = block_delta_layers(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} carries no S2FT block layers: pass a checkpoint trained with "
                         "S2FTStructureCallback, or the selection file its save_selection wrote")
    groups = find_groups(model)
    masks = {}
    for group in groups:
        trained = [role for role, path in group.roles.items() if path in blocks]
        if not trained:
            continue
        role = next((r for r in trained if r not in KV_ROLES), trained[0])
        index = blocks[group.roles[role]].index.cpu()
        covered = torch.isin(group.all_positions(role), index).view(group.units_of(role), -1).all(dim=1)
        masks[group.owner] = covered.repeat_interleave(group.group_size) if role in KV_ROLES else covered
    return _stack(groups, masks)


def selection_from_file(path: str | Path, model_name_or_path: str) -> dict[str, Tensor]:
    """The matrices of a `save_selection` JSON; the model (its config only, built without weights) gives each
    group's layer and unit count."""
    from transformers import AutoConfig, AutoModel

    body = json.loads(Path(path).read_text())
    if body.get("format") != SELECTION_FORMAT:
        raise ValueError(f"{path} is not an S2FT selection file (format {body.get('format')!r}, expected "
                         f"{SELECTION_FORMAT!r}): S2FTStructureCallback(save_selection=...) writes one")
    config = AutoConfig.from_pretrained(resolve_model_path(model_name_or_path))
    if body.get("model_type") not in (None, config.model_type):
        raise ValueError(f"{path} was saved for a {body['model_type']} model, but {model_name_or_path} is "
                         f"{config.model_type}: pass the model the selection was made on")
    with torch.device("meta"):
        skeleton = AutoModel.from_config(config)
    groups = find_groups(skeleton)
    masks = {}
    for owner, entry in body["groups"].items():
        same = [g for g in groups if g.kind == entry["kind"] and (owner == g.owner or owner.endswith("." + g.owner))]
        group = same[0] if same else None
        if group is None:
            raise ValueError(f"{path}: {entry['kind']} group {owner!r} is not in {model_name_or_path} (its groups: "
                             f"{', '.join(g.owner for g in groups[:2])}, ...): pass the model it was saved for")
        units = torch.tensor([int(u) for u in entry["units"]], dtype=torch.long)
        if units.numel() and not bool(((units >= 0) & (units < group.num_units)).all()):
            raise ValueError(f"{path}: {owner} selects units outside 0..{group.num_units - 1}")
        masks[group.owner] = torch.zeros(group.num_units, dtype=torch.bool).index_fill_(0, units, True)
    return _stack(groups, masks)


def display_matrix(matrix: Tensor, max_columns: int = MAX_COLUMNS) -> tuple[Tensor, int]:
    """What a panel draws: the matrix itself, or for wide ones the share selected per bin of `b` units."""
    bin_size = max(1, math.ceil(matrix.shape[1] / max_columns))
    if bin_size == 1:
        return matrix.float(), 1
    padded = torch.zeros(matrix.shape[0], math.ceil(matrix.shape[1] / bin_size) * bin_size)
    padded[:, : matrix.shape[1]] = matrix.float()
    return padded.view(matrix.shape[0], -1, bin_size).mean(dim=2), bin_size


def plot_selection_map(matrices: dict[str, Tensor], path: str | Path, title: str | None = None) -> Any:
    """One heatmap per kind (rows: layers, columns: units; dark = trained). Writes a PNG at `path` and returns
    the (closed) figure."""
    if not matrices:
        raise ValueError("no selected heads or channels to draw")
    plt = pyplot("the S2FT selection map")
    figure, axes = plt.subplots(len(matrices), 1, figsize=(12, 1.2 + 2.4 * len(matrices)), constrained_layout=True,
                                squeeze=False)
    for ax, (kind, matrix) in zip(axes[:, 0], matrices.items()):
        shown, bin_size = display_matrix(matrix)
        ax.imshow(shown.numpy(), cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest",
                  extent=(-0.5, matrix.shape[1] - 0.5, matrix.shape[0] - 0.5, -0.5))
        per_layer = matrix.sum(dim=1).tolist()
        counts = f"{per_layer[0]}" if len(set(per_layer)) == 1 else f"{min(per_layer)}-{max(per_layer)}"
        binned = f"; shade = share selected per bin of {bin_size}" if bin_size > 1 else ""
        ax.set(title=f"{kind}: {counts} of {matrix.shape[1]} per layer trained ({int(matrix.sum())} in all){binned}",
               xlabel=UNIT_NAMES[kind], ylabel="layer")
        ax.set_yticks(range(matrix.shape[0]))
        for layer, count in enumerate(per_layer):  # the count of each row, right of the map
            ax.text(1.005, layer, str(count), transform=ax.get_yaxis_transform(), va="center", fontsize=8)
    if title:
        figure.suptitle(title)
    save(figure, path, dpi=150)
    return figure
