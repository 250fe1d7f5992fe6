"""Training diagnostics for the quality benchmark (issue 28): why a method learns slowly or unstably.

`TrainingDiagnostics` is a Lightning callback the quality driver adds with `--diagnose`. It writes into the run
directory:

- `diagnostics.csv`: every `every` optimizer steps, per parameter group (module type across layers, each encoder
  layer across types, pooler, classifier, embeddings), the gradient norm, the norm of that step's update and the
  norm of the values themselves (for sparse deltas and LoRA factors: the trained increment so far).
- `selection.json` (element-sparse methods): per target weight, the chosen indices at the start of training,
  and where the budget would go under a global top-k of the same calibration gradient (per layer and module
  type), with the gradient mass per weight. Indices are k-sized (scale rule: what trains).

It reads the model through the library's public surface (`sparse_delta_layers`, `summed_weight_gradients`, the
module's `calibration()`); it changes no parameter, and the extra calibration pass runs in eval mode and leaves
no gradient behind, so a diagnosed run trains exactly as the plain run would.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from sparse_lightning.methods.sift import summed_weight_gradients
from sparse_lightning.sparse import sparse_delta_layers

# Module types in BERT-style encoders, most specific first ("attention.output.dense" before "output.dense").
_TYPES = [("attention.self.query", "query"), ("attention.self.key", "key"), ("attention.self.value", "value"),
          ("attention.output.dense", "attn_out"), ("intermediate.dense", "ffn_in"), ("output.dense", "ffn_out"),
          ("LayerNorm", "norm"), ("pooler", "pooler"), ("classifier", "classifier"), ("embeddings", "embeddings")]
_LAYER = re.compile(r"layer\.(\d+)\.")


def module_type(name: str) -> str:
    for needle, label in _TYPES:
        if needle in name:
            return label
    return "other"


def groups_of(name: str) -> list[str]:
    """The groups a parameter (or layer) name counts in: its type, and its encoder layer if it has one."""
    kind = module_type(name)
    layer = _LAYER.search(name)
    return [f"type:{kind}"] + ([f"layer:{layer.group(1)}"] if layer and kind not in ("pooler", "classifier") else [])


class TrainingDiagnostics(Callback):
    """Log per-group gradient, update and value norms every `every` steps; record the sparse selection."""

    def __init__(self, out: str, every: int = 10, calibration_batches: int = 8) -> None:
        self.out = Path(out)
        self.every = every
        self.calibration_batches = calibration_batches
        self._before: dict[str, torch.Tensor] | None = None
        self._grads: dict[str, float] = {}

    # -- the selection --------------------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        layers = sparse_delta_layers(pl_module)
        if not layers or trainer.global_step > 0:
            return
        calibration = pl_module.calibration()
        scores = summed_weight_gradients(pl_module, layers, calibration.batches(self.calibration_batches),
                                         calibration.loss_fn)
        budget = sum(layer.k for layer in layers.values())
        flat = torch.cat([scores[name].abs().view(-1) for name in layers])
        threshold = torch.topk(flat, budget, sorted=False).values.min()
        total_mass = float(flat.sum())
        record: dict[str, dict] = {}
        for name, layer in layers.items():
            score = scores[name].abs().view(-1)
            own = torch.topk(score, layer.k, sorted=False).indices.sort().values
            chosen = layer.delta_indices.long().sort().values
            record[name] = {
                "groups": groups_of(name), "numel": score.numel(), "k": layer.k,
                "k_global_topk": int((score >= threshold).sum()),
                "gradient_mass_share": float(score.sum()) / total_mass,
                "selected_mass_share": float(score[chosen].sum()) / max(float(score.sum()), 1e-30),
                "own_topk_matches_selection": float(torch.isin(own, chosen).float().mean()),
                "indices": chosen.tolist(),
            }
        (self.out / "selection.json").write_text(json.dumps({"budget": budget, "weights": record}))

    # -- norms during training -------------------------------------------------------------------------------------

    def _due(self, trainer: pl.Trainer) -> bool:
        return trainer.global_step % self.every == 0

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if not self._due(trainer):
            return
        trainable = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        self._grads = {n: float(p.grad.float().norm()) ** 2 for n, p in trainable.items() if p.grad is not None}
        self._before = {n: p.detach().float().clone() for n, p in trainable.items()}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if self._before is None:
            return
        sums: dict[str, dict[str, float]] = {}
        for name, param in pl_module.named_parameters():
            if name not in self._before:
                continue
            value = param.detach().float()
            squares = {"grad": self._grads.get(name, 0.0), "update": float((value - self._before[name]).norm()) ** 2,
                       "value": float(value.norm()) ** 2, "numel": float(value.numel())}
            for group in ["all", *groups_of(name)]:
                row = sums.setdefault(group, {"grad": 0.0, "update": 0.0, "value": 0.0, "numel": 0.0})
                for key, amount in squares.items():
                    row[key] += amount
        self._before = None
        path = self.out / "diagnostics.csv"
        new = not path.exists() or trainer.global_step <= self.every
        with path.open("w" if new else "a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["step", "group", "numel", "grad_norm", "update_norm", "value_norm", "lr"])
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            for group, row in sorted(sums.items()):
                writer.writerow([trainer.global_step, group, int(row["numel"]), f"{row['grad'] ** 0.5:.6g}",
                                 f"{row['update'] ** 0.5:.6g}", f"{row['value'] ** 0.5:.6g}", f"{lr:.6g}"])
