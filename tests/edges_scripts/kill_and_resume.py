"""Kill -9 tiny runs right after a checkpoint (mid-epoch, and at an epoch boundary), resume them, save final states.

usage: kill_and_resume.py OUT MODEL_DIR METHOD [METHOD ...]   (methods: sparse_lightning.registry's, and VARIANTS)

The killed runs are forked children that SIGKILL themselves, forked before this process computes anything (so no
thread pool is inherited half-used); this process then runs each method uninterrupted and resumed from both
checkpoints, and writes `<method>/<run>.pt` (the trainable state) and `status.json` (how each child ended).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "distributed_scripts"))

from contract_run import SETTINGS as CONTRACT_SETTINGS  # noqa: E402
from datamodules.glue import GLUEDataModule  # noqa: E402
from sparse_lightning.modules import LoRASettings, SequenceClassificationModule  # noqa: E402
from sparse_lightning.registry import method as registry_method  # noqa: E402

DATA = REPO / "tests" / "data" / "sst2_tiny"
EPOCHS, STEPS_PER_EPOCH = 2, 4  # 64 rows, batch 16, shuffled by (seed, epoch)
KILLS = {"mid": 3, "boundary": STEPS_PER_EPOCH}  # global_step at which the next batch never runs
RESUME_FROM = {"mid": "mid-step=3.ckpt", "boundary": "epoch=0.ckpt"}
#: Every method of the registry -> its small settings: the contract matrix's (tests/distributed_scripts/contract_run.py)
#: for the sparse methods, LoRA's here; a missing one fails the test.
SETTINGS = {**CONTRACT_SETTINGS, "lora": {"r": 2}, "full": {}}
#: Runs that are a method with something else changed -> (method, model_kwargs, callback settings): with dropout on, the
#: resumed run must continue the random stream; with SIFT's global allocation it must also take the checkpoint's sizes
#: after its own calibration chose again in configure_model.
DROPOUT = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
VARIANTS = {"sift_dropout": ("sift", DROPOUT, {}), "sift_global": ("sift", DROPOUT, {"allocation": "global"})}


class KillAt(Callback):
    """SIGKILL this process as the batch after `step` optimizer steps starts (its checkpoints are already written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def fit(method: str, model_dir: str, root: Path, ckpt_path: Path | None = None, kill_at: int | None = None):
    pl.seed_everything(0, verbose=False)
    name, dropout, changed = VARIANTS.get(method, (method, {}, {}))
    row = registry_method(name)
    lora = LoRASettings(**SETTINGS[name]) if name == "lora" else None
    module = SequenceClassificationModule(model_dir, lora=lora, optimizer=row.make_optimizer(lr=1e-2),
                                          model_kwargs=dropout)
    callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=root, filename="mid-{step}", every_n_train_steps=3, save_top_k=-1),
        ModelCheckpoint(dirpath=root, filename="{epoch}", every_n_epochs=1, save_top_k=-1),
    ]
    if row.sparse:
        callbacks.append(row.make_callback(**{**SETTINGS[name], **changed}))
    if kill_at is not None:
        callbacks.append(KillAt(kill_at))
    datamodule = GLUEDataModule(task="sst2", tokenizer_name_or_path=model_dir, train_file=str(DATA / "train.tsv"),
                                validation_files=[str(DATA / "dev.tsv")], batch_size=16, max_length=32, seed=7)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=EPOCHS, limit_val_batches=0, logger=False,
                         callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(root))
    trainer.fit(module, datamodule, ckpt_path=ckpt_path)
    assert trainer.global_step == EPOCHS * STEPS_PER_EPOCH
    return {name: tensor.detach().clone() for name, tensor in module.model.state_dict().items()}  # the base too


def main(out: Path, model_dir: str, methods: list[str]) -> None:
    status = {}
    for method in methods:
        for point, step in KILLS.items():
            pid = os.fork()
            if pid == 0:
                try:
                    fit(method, model_dir, out / method / point, kill_at=step)
                finally:
                    os._exit(17)  # the kill never came
            _, code = os.waitpid(pid, 0)
            status[f"{method}/{point}"] = os.WTERMSIG(code) if os.WIFSIGNALED(code) else -os.WEXITSTATUS(code)
    for method in methods:
        torch.save(fit(method, model_dir, out / method / "uninterrupted"), out / method / "uninterrupted.pt")
        for point in KILLS:
            resumed = fit(method, model_dir, out / method / f"resumed-{point}",
                          ckpt_path=out / method / point / RESUME_FROM[point])
            torch.save(resumed, out / method / f"resumed-{point}.pt")
    (out / "status.json").write_text(json.dumps(status))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
