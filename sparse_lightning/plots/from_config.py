"""A model and its training batches from the same `--config` files `sparse-lightning fit` takes, without
training: what the quasi-sparsity and selection-map commands calibrate on."""

from __future__ import annotations

import warnings
from typing import Any

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningCLI

from sparse_lightning.methods.calibration import Calibration
from sparse_lightning.modules import SparseFineTuningModule


def build_from_config(args: list[str], cli_class: type[LightningCLI]) -> tuple[SparseFineTuningModule,
                                                                              LightningDataModule, Trainer]:
    """The module (its HF model built, no method attached), the datamodule and the trainer the config describes;
    `cli_class` is `sparse_lightning.cli.SparseLightningCLI` (passed in: that module runs the plot command)."""
    if not args:
        raise ValueError("give the run's configs, e.g. --config configs/model/minilm.yaml --config "
                         "configs/task/sst2.yaml")
    with warnings.catch_warnings():  # args are the command line's own, after `plot <figure>` and its options
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = cli_class(SparseFineTuningModule, subclass_mode_model=True, subclass_mode_data=True,
                                 args=args, run=False, save_config_callback=None)
    if cli.datamodule is None:
        raise ValueError("the configs name no datamodule (data.class_path): add a task config such as "
                         "configs/task/sst2.yaml")
    cli.model.configure_model()
    return cli.model, cli.datamodule, cli.trainer


def training_calibration(module: SparseFineTuningModule, datamodule: LightningDataModule) -> Calibration:
    """The first training batches in the datamodule's order (seeded by the config) and the module's training loss,
    as `SparseFineTuningModule.calibration` gives them under a Trainer."""
    datamodule.setup("fit")

    def draw(count: int) -> list[dict[str, Any]]:
        batches = []
        for batch in datamodule.train_dataloader():
            if len(batches) == count:
                break
            batches.append(batch)
        return batches

    return Calibration(draw=draw, loss_fn=module.compute_loss)
