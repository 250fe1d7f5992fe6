"""A short S2FT run on tiny BERT that saves, per rank, its co-permutation, block positions, trained blocks and the
examples it read.

Activation-norm selection from 2 calibration batches (statistics summed over ranks), o/v heads and down/up
channels, `STEPS` steps in one epoch and a full checkpoint at the end (`last.ckpt`). Run standalone
(`python s2ft_run.py --strategy ddp|fsdp2 ...`): Lightning relaunches this script once per rank.
`tests/test_s2ft_distributed.py` also imports `run` for the single-process reference.
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
from sparse_lightning.callbacks import S2FTStructureCallback  # noqa: E402
from sparse_lightning.modules import SequenceClassificationModule  # noqa: E402
from sparse_lightning.sparse.block import block_delta_layers  # noqa: E402
from tests.distributed_scripts.sift_run import DATA, full, make_strategy  # noqa: E402

STEPS = 3


class SaveResults(pl.Callback):
    def __init__(self, output: Path) -> None:
        self.output = output

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.order = [int(i) for i in trainer.train_dataloader.sampler]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = block_delta_layers(pl_module.model)
        result = {
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "permutations": {name: b.cpu().clone() for name, b in pl_module.model.named_buffers() if "s2ft" in name},
            "positions": {name: layer.index.cpu().clone() for name, layer in layers.items()},
            "blocks": {name: full(layer.delta_block) for name, layer in layers.items()},
            "classifier": {name: full(p) for name, p in pl_module.model.classifier.named_parameters()},
            "block_type": type(next(iter(layers.values())).delta_block).__name__,
            "order": self.order,
        }
        self.output.mkdir(parents=True, exist_ok=True)
        torch.save(result, self.output / f"rank{trainer.global_rank}.pt")


def run(model_dir: str, output: Path, strategy: str = "auto", devices: int = 1, batch_size: int = 8,
        train_file: Path = DATA / "train.tsv") -> None:
    pl.seed_everything(0, verbose=False)
    datamodule = GLUEDataModule(task="sst2", tokenizer_name_or_path=model_dir, train_file=str(train_file),
                                validation_files=[str(DATA / "dev.tsv")], batch_size=batch_size, shuffle=False,
                                max_length=32)
    module = SequenceClassificationModule(model_dir, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
                                          lr_schedule="constant")
    s2ft = S2FTStructureCallback(num_heads=1, num_channels=8, train=["o", "v", "down", "up"], select_by="activation",
                                 calibration_batches=2)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=make_strategy(strategy, devices), max_epochs=1,
        limit_train_batches=STEPS, limit_val_batches=0,
        callbacks=[s2ft, SaveResults(output), ModelCheckpoint(dirpath=output, filename="last")],
        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(output / "root"),
    )
    trainer.fit(module, datamodule)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args.model_dir, args.output, args.strategy, args.devices, args.batch_size)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
