"""Loading by shards against the full load, on 2 CPU ranks under FSDP2 (tests/test_sharded_loading.py).

In the same two processes, one model directory is fitted twice from the same seed with one method (the random mask,
S2FT with a random or weight-norm selection training rows and columns, or LoRA with a dense head and pooler on
BERT): `shards` (the library's loader: meta-device build, each rank reads its rows) and `full` (every rank runs
`from_pretrained`, the path before sharded loading), optionally from an `init_delta` (the sharded load adds each
rank's entries to its rows; the full load merges it into the whole model). Every rank writes `<loader>/rank<r>.pt`: whether the built model was on the meta
device, every parameter (gathered) and buffer at `on_train_start`, the step losses and the trained deltas.

    python sharded_load_run.py --model_dir DIR --task causal_lm|classification --method random_mask|s2ft|lora \
        [--select_by weight] [--init_delta DELTA_DIR [--dtype float16]] --output OUT

An `init_delta` that is refused (base + delta not finite in `--dtype`) makes every rank write `<loader>/rank<r>.pt`
holding only the error: a rank that waited on the others would never write it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from sparse_lightning.callbacks import RandomMaskCallback, S2FTStructureCallback  # noqa: E402
from sparse_lightning.export import DeltaFileError  # noqa: E402
from sparse_lightning.models import resolve_model_path  # noqa: E402
from sparse_lightning.modules import CausalLMModule, SequenceClassificationModule  # noqa: E402
from sparse_lightning.registry import names  # noqa: E402

STEPS = 3


def full(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).cpu().clone()


def module_class(task: str, loader: str) -> type:
    base = CausalLMModule if task == "causal_lm" else SequenceClassificationModule

    class Module(base):
        def build_model(self):
            model = super().build_model()
            self.built_on_meta = any(p.is_meta for p in model.parameters())
            return model

        def load_pretrained(self, auto_class: Any, model_name_or_path: str, **kwargs: Any):
            if loader == "full":  # the path before sharded loading: the whole model on every rank
                return auto_class.from_pretrained(resolve_model_path(model_name_or_path), **kwargs)
            return super().load_pretrained(auto_class, model_name_or_path, **kwargs)

    return Module


class Tokens(pl.LightningDataModule):
    """Random token rows (the same on every rank and run); each rank reads its own rows."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def train_dataloader(self) -> DataLoader:
        ids = torch.randint(0, self.vocab, (4 * STEPS, 16), generator=torch.Generator().manual_seed(0))
        rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
        return DataLoader(rows, batch_size=2)


class Record(pl.Callback):
    def __init__(self, output: Path) -> None:
        self.output = output
        self.result: dict[str, Any] = {"losses": []}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = pl_module.model
        self.result["built_on_meta"] = pl_module.built_on_meta
        self.result["init_delta_merged"] = pl_module._init_delta_merged
        self.result["base_fingerprint"] = pl_module._base_fingerprint  # what a delta checkpoint records
        self.result["start_parameters"] = {name: full(p) for name, p in model.named_parameters()}
        self.result["start_buffers"] = {name: b.detach().cpu().clone() for name, b in model.named_buffers()}
        self.result["local_parameter_dtypes"] = {name: p.dtype for name, p in model.named_parameters()}
        from torch.distributed.fsdp import FSDPModule

        self.result["fsdp_units"] = sorted(name for name, m in model.named_modules() if isinstance(m, FSDPModule))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.result["losses"].append(float(outputs["loss"].detach()))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = pl_module.model
        self.result["trained"] = {name: full(p) for name, p in model.named_parameters() if p.requires_grad}
        self.output.mkdir(parents=True, exist_ok=True)
        torch.save(self.result, self.output / f"rank{trainer.global_rank}.pt")


def method_settings(method: str, task: str, select_by: str = "random") -> tuple[list[pl.Callback], dict[str, Any]]:
    """(callbacks, module kwargs) of the method (`select_by`: S2FT's)."""
    if method == "random_mask":
        return [RandomMaskCallback(density=0.05)], {}
    if method == "s2ft":  # heads (o columns, v rows) and channels (down columns, up rows: 67 split unevenly)
        return [S2FTStructureCallback(num_heads=2, num_channels=5, train=["o", "v", "down", "up"], seed=3,
                                      select_by=select_by)], {}
    heads = {"modules_to_save": ["classifier", "pooler"]} if task == "classification" else {}
    return [], {"lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"] if task == "classification"
                         else ["q_proj", "v_proj", "down_proj"], **heads}}


def run(model_dir: str, task: str, method: str, select_by: str, init_delta: str | None, dtype: str | None,
        loader: str, output: Path) -> None:
    pl.seed_everything(0, verbose=False)
    callbacks, settings = method_settings(method, task, select_by)
    settings["init_delta"] = init_delta
    if dtype:
        settings["dtype"] = dtype
    optimizer = lambda p: torch.optim.AdamW(p, lr=1e-2)  # noqa: E731
    if task == "causal_lm":
        module = module_class(task, loader)(model_dir, optimizer=optimizer, **settings)
        from transformers import AutoConfig

        data = Tokens(AutoConfig.from_pretrained(model_dir).vocab_size)
    else:
        from datamodules.glue import GLUEDataModule

        module = module_class(task, loader)(model_dir, num_labels=2, optimizer=optimizer, **settings)
        data = GLUEDataModule(task="sst2", tokenizer_name_or_path=model_dir,
                              train_file=str(REPO / "tests" / "data" / "sst2_tiny" / "train.tsv"),
                              validation_files=[str(REPO / "tests" / "data" / "sst2_tiny" / "dev.tsv")],
                              batch_size=2, shuffle=False, max_length=32)
    trainer = pl.Trainer(accelerator="cpu", devices=2,
                         strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                         max_steps=STEPS, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[*callbacks, Record(output / loader)], default_root_dir=str(output / "root"))
    trainer.fit(module, datamodule=data)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--task", required=True, choices=["causal_lm", "classification"])
    parser.add_argument("--method", default="random_mask", choices=names())
    parser.add_argument("--select_by", default="random", help="S2FT's selection")
    parser.add_argument("--init_delta", default=None, help="a delta or PEFT adapter directory to start from")
    parser.add_argument("--dtype", default=None, help="causal_lm: the base's dtype")
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for loader in ("shards", "full"):
        try:
            run(args.model_dir, args.task, args.method, args.select_by, args.init_delta, args.dtype, loader,
                args.output)
        except DeltaFileError as error:
            (args.output / loader).mkdir(parents=True, exist_ok=True)
            torch.save({"error": str(error)}, args.output / loader / f"rank{os.environ.get('LOCAL_RANK', 0)}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
