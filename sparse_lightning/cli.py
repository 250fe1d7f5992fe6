"""`sparse-lightning fit|validate|test|export`: LightningCLI in subclass mode, plus delta export."""

from __future__ import annotations

import sys

from jsonargparse import ArgumentParser
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

from sparse_lightning.modules import SparseFineTuningModule


class SaveConfigToRunDirectory(SaveConfigCallback):
    """Writes config.yaml beside the logger's files; a run without a logger has no run directory, and Lightning's
    fallback (the working directory) would leave a stray config.yaml wherever the command was typed."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.logger is not None:
            super().setup(trainer, pl_module, stage)


class SparseLightningCLI(LightningCLI):
    """Prints the final metrics, so a run ends with the number it was for."""

    def _report(self) -> None:
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()
                   if k.startswith(("val/", "test/")) and v.numel() == 1}
        if metrics:
            rank_zero_info("final metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))

    def after_fit(self) -> None:
        self._report()

    def after_validate(self) -> None:
        self._report()

    def after_test(self) -> None:
        self._report()


def export_main(argv: list[str]) -> None:
    from sparse_lightning.export import export_checkpoint

    parser = ArgumentParser(prog="sparse-lightning export", description="Export a trained delta and/or a merged HF model")
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by sparse-lightning fit")
    parser.add_argument("--output", required=True, help="directory for delta.safetensors + delta_config.json")
    parser.add_argument("--merged", type=bool, default=False, help="also write a merged plain HF model to OUTPUT/merged")
    args = parser.parse_args(argv)
    for kind, path in export_checkpoint(args.ckpt_path, args.output, merged=args.merged).items():
        print(f"wrote {kind}: {path}")


def main(argv: list[str] | None = None) -> None:
    command = sys.argv[1:] if argv is None else argv
    if command and command[0] == "export":
        export_main(command[1:])
        return
    SparseLightningCLI(SparseFineTuningModule, subclass_mode_model=True, subclass_mode_data=True, args=argv,
                       save_config_callback=SaveConfigToRunDirectory, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
