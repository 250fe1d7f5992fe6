"""The contract matrix's runs: every method on tiny BERT, the same way in one process and on several ranks.

`METHODS` and `build_method` are the one place the contract tests (tests/test_contract.py,
tests/test_contract_distributed.py, tests/test_contract_mixed_precision.py) build a method: its callback with small,
fast settings and its optimizer.
`run` fits one of them on the tiny SST-2 file for `STEPS` steps in one epoch, checkpointing mid-epoch
(`step=3.ckpt`, full), at the end (`last.ckpt`, full) and weights only (`weights.ckpt`), optionally resumed from a
checkpoint, in any Trainer precision and FSDP2 parameter dtype (tests/distributed_scripts/precision_run.py); every rank
writes `rank<r>.pt` (its buffers, gathered trainable tensors, dtypes, losses, data order, reselections).

Run standalone, Lightning relaunches this script once per rank, and every run listed in `--strategies` happens
in those same processes (the process group is created once), each in `OUTPUT/<strategy>`; `--resume` then resumes
the runs of the strategies it lists from their mid-epoch checkpoints into `OUTPUT/<strategy>-resumed`:

    python contract_run.py --method spiel_ag --model_dir DIR --output OUT --strategies ddp,fsdp2 --resume fsdp2

`--overrides '{"allocation": "global"}'` changes the method's settings (tests/test_sift_global.py). `--init_delta DIR`
starts every run from an exported delta (tests/test_fsdp2_checkpoint_keys.py). `--resume_from NAME,...` resumes from
those checkpoints in each strategy's folder instead (into `OUTPUT/<strategy>-from-<NAME>`); one refused for its
tensors (`CheckpointKeysError`) makes every rank write `rank<r>.pt` holding only the error, which a rank left
waiting on the others would never write.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from datamodules.glue import GLUEDataModule  # noqa: E402
from sparse_lightning.callbacks import PruneRegrowCallback  # noqa: E402
from sparse_lightning.delta_checkpoint import CheckpointKeysError  # noqa: E402
from sparse_lightning.modules import SequenceClassificationModule  # noqa: E402
from sparse_lightning.registry import method as registry_method  # noqa: E402
from sparse_lightning.registry import names  # noqa: E402

DATA = REPO / "tests" / "data" / "sst2_tiny"
STEPS = 4  # optimizer steps per run, in one epoch
CHECKPOINT_STEP = 3  # the mid-epoch checkpoint a resumed run starts from
LR = 1e-2

#: Every sparse method of `sparse_lightning.registry` -> its small, fast settings (a method missing here fails every
#: matrix that reads the registry). SpIEL reselects at steps 1 (everything) and 3 (partly), the window of the second
#: being step 2: the mid-epoch checkpoint at step 3 holds that window's statistics.
SPIEL = {"density": 0.002, "reselection_interval": 2, "accumulation_steps": 1, "regrow_fraction": 0.8}
SETTINGS: dict[str, dict[str, Any]] = {
    "sift": {"density": 0.05, "calibration_batches": 2},
    "spiel_ag": SPIEL,
    "spiel_ma": SPIEL,
    "s2ft": {"num_heads": 1, "num_channels": 8, "train": ["o", "v", "down", "up"], "select_by": "activation",
             "calibration_batches": 2},
    "random_mask": {"density": 0.05},
}
#: The contract matrix: the registry's sparse methods, in its order.
METHODS = names(sparse=True)


def build_method(name: str, **overrides: Any) -> tuple[pl.Callback, Callable]:
    """The method's callback (the registry's class, these settings updated by `overrides`) and its optimizer
    factory (the registry's: SM3 for SpIEL-MA)."""
    row = registry_method(name)
    return row.make_callback(**{**SETTINGS[name], **overrides}), row.make_optimizer(lr=LR)


def make_datamodule(model_dir: str | Path, batch_size: int = 16, train_file: str | Path = DATA / "train.tsv",
                    **kwargs: Any) -> GLUEDataModule:
    """The tiny SST-2 file (64 rows) in file order, 32 tokens at most."""
    settings = {"task": "sst2", "tokenizer_name_or_path": str(model_dir), "train_file": str(train_file),
                "validation_files": [str(DATA / "dev.tsv")], "batch_size": batch_size, "shuffle": False,
                "max_length": 32}
    return GLUEDataModule(**{**settings, **kwargs})


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The global tensor on every rank (FSDP2 parameters are DTensors; full_tensor is a collective)."""
    tensor = tensor.detach()
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.cpu().clone()


class SaveResults(pl.Callback):
    """At the end of training every rank writes its buffers (indices, permutations, block positions), gathered
    trainable tensors, the dtypes of its parameters and optimizer state, its per-step losses, the dataset positions
    it read per epoch, SpIEL's reselections, and how the base was built (on the meta device: loaded by shards)."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.orders: dict[int, list[int]] = {}
        self.losses: list[float] = []
        self.built_on_meta: bool | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        build = pl_module.build_model  # called once by configure_model, right after this hook

        def recorded_build() -> torch.nn.Module:
            model = build()
            self.built_on_meta = any(p.is_meta for p in model.parameters())
            return model

        pl_module.build_model = recorded_build

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.orders[trainer.current_epoch] = [int(i) for i in trainer.train_dataloader.sampler]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach().float()))  # this rank's batch

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = pl_module.model
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        names = {id(p): name for name, p in trainable.items()}
        optimizer_state = {names[id(p)]: state for opt in trainer.optimizers for p, state in opt.state.items()
                           if id(p) in names}
        result = {
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "buffers": {name: b.detach().cpu().clone() for name, b in model.named_buffers()},
            "trained": {name: full(p) for name, p in trainable.items()},
            "param_types": {name: type(p).__name__ for name, p in trainable.items()},
            "param_dtypes": {name: p.dtype for name, p in trainable.items()},  # as stored (FSDP2: the shard)
            "frozen_dtypes": sorted({p.dtype for p in model.parameters() if not p.requires_grad}, key=str),
            "state_dtypes": {name: {key: v.dtype for key, v in state.items() if torch.is_tensor(v)}
                             for name, state in optimizer_state.items()},
            "losses": self.losses,
            "orders": self.orders,
            "reselections": [(r["step"], sum(r["replaced"].values())) for cb in trainer.callbacks
                             if isinstance(cb, PruneRegrowCallback) for r in cb.history],
            "init_delta_merged": pl_module._init_delta_merged,
            "built_on_meta": self.built_on_meta,
        }
        self.output.mkdir(parents=True, exist_ok=True)
        torch.save(result, self.output / f"rank{trainer.global_rank}.pt")


def make_strategy(name: str, devices: int):
    """"ddp", "fsdp2" (one gathered checkpoint file, as the library's configs save) or "fsdp2_dcp" (Lightning's
    default: a distributed checkpoint directory, one shard file per rank)."""
    if name in ("fsdp2", "fsdp2_dcp"):
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1,
                                     save_distributed_checkpoint=name == "fsdp2_dcp")
    return name


def run(model_dir: str | Path, output: Path, method: str = "sift", strategy: str = "auto", devices: int = 1,
        batch_size: int = 16, train_file: str | Path = DATA / "train.tsv", resume: Path | None = None,
        overrides: dict[str, Any] | None = None, precision: str = "32-true", fsdp_param_dtype: str | None = None,
        init_delta: str | None = None) -> tuple[SequenceClassificationModule, pl.Trainer]:
    """A fresh module, callback, datamodule and trainer, as a new process would build them; `STEPS` steps."""
    pl.seed_everything(0, verbose=False)
    callback, optimizer = build_method(method, **(overrides or {}))
    module = SequenceClassificationModule(str(model_dir), optimizer=optimizer, fsdp_param_dtype=fsdp_param_dtype,
                                          init_delta=init_delta)
    middle = ModelCheckpoint(dirpath=output, filename="{step}", every_n_train_steps=CHECKPOINT_STEP, save_top_k=-1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=make_strategy(strategy, devices), precision=precision,
        max_epochs=1, limit_train_batches=STEPS, limit_val_batches=0, callbacks=[callback, SaveResults(output), middle],
        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(output / "root"),
    )
    trainer.fit(module, make_datamodule(model_dir, batch_size, train_file), ckpt_path=resume)
    trainer.save_checkpoint(output / "last.ckpt")  # on every rank: FSDP2 gathers a full checkpoint for rank 0
    trainer.save_checkpoint(output / "weights.ckpt", weights_only=True)
    return module, trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", required=True, choices=list(METHODS))
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--strategies", default="ddp", help="comma-separated: ddp, fsdp2, fsdp2_dcp")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--resume", default="", help="comma-separated strategies whose run is then resumed from its "
                                                     "mid-epoch checkpoint")
    parser.add_argument("--overrides", type=json.loads, default={},
                        help='JSON: the callback settings changed from SETTINGS, e.g. {"allocation": "global"}')
    parser.add_argument("--init_delta", default=None, help="an exported delta directory every run starts from")
    parser.add_argument("--resume_from", default="",
                        help="comma-separated checkpoint names in each --resume strategy's folder to resume from "
                             f"instead of step={CHECKPOINT_STEP}.ckpt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = {"overrides": args.overrides, "init_delta": args.init_delta}
    for strategy in filter(None, args.strategies.split(",")):
        run(args.model_dir, args.output / strategy, args.method, strategy, args.devices, args.batch_size, **settings)
    for strategy in filter(None, args.resume.split(",")):
        if not args.resume_from:
            run(args.model_dir, args.output / f"{strategy}-resumed", args.method, strategy, args.devices,
                args.batch_size, resume=args.output / strategy / f"step={CHECKPOINT_STEP}.ckpt", **settings)
        for name in filter(None, args.resume_from.split(",")):
            output = args.output / f"{strategy}-from-{name}"
            try:
                run(args.model_dir, output, args.method, strategy, args.devices, args.batch_size,
                    resume=args.output / strategy / name, **settings)
            except CheckpointKeysError as error:
                output.mkdir(parents=True, exist_ok=True)
                torch.save({"error": str(error)}, output / f"rank{os.environ.get('LOCAL_RANK', 0)}.pt")
    # Tear gloo down before interpreter exit: left to exit-time destructors it can abort ("terminate called").
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
