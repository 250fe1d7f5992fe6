"""A short SIFT or SpIEL run on tiny BERT that saves, per rank, the full selection, trained values and the examples
it read.

Two epochs of `limit_train_batches` steps each, a full checkpoint after every epoch (`epoch=0.ckpt`, `epoch=1.ckpt`),
optionally resumed from one (`--resume`). Run standalone (`python sift_run.py --strategy ddp|fsdp2 ...`): Lightning
relaunches this script once per rank. `tests/test_distributed.py` also imports `run` for the single-process reference.
`--method spiel_ag|spiel_ma` swaps SIFT for SpIEL (reselections at steps 1 and 3 of the 4).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from datamodules.glue import GLUEDataModule  # noqa: E402
from sparse_lightning.callbacks import GradientTopKCallback, PruneRegrowCallback  # noqa: E402
from sparse_lightning.modules import SequenceClassificationModule  # noqa: E402
from sparse_lightning.sparse import sparse_delta_layers  # noqa: E402
from sparse_lightning.sparse.optim import SM3  # noqa: E402

DATA = REPO / "tests" / "data" / "sst2_tiny"


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The global tensor on every rank (FSDP2 parameters are DTensors; full_tensor is a collective)."""
    tensor = tensor.detach()
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.cpu().clone()


class SaveResults(pl.Callback):
    """At the end of training, every rank writes its selection, trained values, classifier and data order."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.orders: dict[int, list[int]] = {}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The dataset positions this rank reads this epoch, in order (whatever sampler Lightning put in).
        self.orders[trainer.current_epoch] = [int(i) for i in trainer.train_dataloader.sampler]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = sparse_delta_layers(pl_module.model)
        result = {
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "indices": {name: layer.delta_indices.detach().cpu().clone() for name, layer in layers.items()},
            "values": {name: full(layer.delta_values) for name, layer in layers.items()},
            "classifier": {name: full(p) for name, p in pl_module.model.classifier.named_parameters()},
            "values_type": type(next(iter(layers.values())).delta_values).__name__,
            "orders": self.orders,
            "reselections": [(r["step"], sum(r["replaced"].values())) for cb in trainer.callbacks
                             if isinstance(cb, PruneRegrowCallback) for r in cb.history],
        }
        self.output.mkdir(parents=True, exist_ok=True)
        torch.save(result, self.output / f"rank{trainer.global_rank}.pt")


def make_strategy(name: str, devices: int):
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1,
                                     save_distributed_checkpoint=False)
    return name


def run(model_dir: str, output: Path, strategy: str = "auto", devices: int = 1, batch_size: int = 8,
        max_epochs: int = 2, limit_train_batches: int | None = 2, train_file: Path = DATA / "train.tsv",
        resume: Path | None = None, method: str = "sift") -> None:
    pl.seed_everything(0, verbose=False)
    datamodule = GLUEDataModule(task="sst2", tokenizer_name_or_path=model_dir, train_file=str(train_file),
                                validation_files=[str(DATA / "dev.tsv")], batch_size=batch_size, shuffle=False,
                                max_length=32)
    optimizer = functools.partial(SM3 if method == "spiel_ma" else torch.optim.AdamW, lr=1e-2)
    module = SequenceClassificationModule(model_dir, optimizer=optimizer, lr_schedule="constant")
    if method == "sift":
        sparse = GradientTopKCallback(density=0.05, calibration_batches=2)
    else:
        sparse = PruneRegrowCallback(density=0.002, regrowth="gradient" if method == "spiel_ag" else "momentum",
                                     reselection_interval=2, accumulation_steps=1, regrow_fraction=0.8)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=make_strategy(strategy, devices), max_epochs=max_epochs,
        limit_train_batches=limit_train_batches, limit_val_batches=0,
        callbacks=[sparse, SaveResults(output),
                   ModelCheckpoint(dirpath=output, filename="{epoch}", every_n_epochs=1, save_top_k=-1)],
        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(output / "root"),
    )
    trainer.fit(module, datamodule, ckpt_path=resume)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--resume", type=Path, default=None)
    parser.add_argument("--method", default="sift", choices=["sift", "spiel_ag", "spiel_ma"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args.model_dir, args.output, args.strategy, args.devices, args.batch_size, resume=args.resume, method=args.method)
    # Tear gloo down before interpreter exit: left to exit-time destructors it can abort ("terminate called").
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
