"""A real SIFT fine-tune: SmolLM2-135M-Instruct on real math word problems (../shared/data), 40 steps on CPU.

The held-out loss on the same records falls, and the tuned model's greedy generations still end in a number the
math extractor reads. Slow (5 min on a shared 2-core CPU, ~3 GB), and why the unit tests may trust the tiny models.
"""

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from datamodules.reasoning import MathDataModule
from sparse_lightning.callbacks import GradientTopKCallback
from sparse_lightning.eval import extract_math_answer
from sparse_lightning.modules import CausalLMModule
from sparse_lightning.sparse import sparse_delta_layers

STEPS, BATCH = 40, 4  # 160 training records; batch 4 keeps the peak near 3 GB


def run_trainer(root: Path, **kwargs) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, default_root_dir=root, num_sanity_val_steps=0, **kwargs)


def heldout_loss_and_generations(module: CausalLMModule, datamodule: MathDataModule, root: Path) -> tuple[float, list]:
    run = run_trainer(root)
    run.validate(module, datamodule)
    lines = (root / "predictions_val_step0.jsonl").read_text().splitlines()
    return float(run.callback_metrics["val/heldout/loss"]), [json.loads(line) for line in lines]


@pytest.mark.slow
def test_sift_on_smollm2_lowers_the_heldout_loss_and_answers_still_parse(shared_data, tmp_path):
    torch.manual_seed(0)
    datamodule = MathDataModule(
        data_dir=str(shared_data / "math_reasoning"), eval_datasets=["AddSub"], max_eval_samples_per_dataset=4,
        max_train_samples=STEPS * BATCH, val_fraction=0.01, max_length=256, batch_size=BATCH, eval_batch_size=4, seed=0,
    )
    module = CausalLMModule("SmolLM2-135M-Instruct", optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
                            max_new_tokens=96, save_predictions=4)
    before, _ = heldout_loss_and_generations(module, datamodule, tmp_path / "before")

    run_trainer(tmp_path / "fit", max_steps=STEPS, limit_val_batches=0,
                callbacks=[GradientTopKCallback(density=0.01, calibration_batches=1)]).fit(module, datamodule)
    layers = sparse_delta_layers(module.model)
    assert len(layers) == 30 * 7 and all(layer.delta_values.abs().sum() > 0 for layer in layers.values())

    after, samples = heldout_loss_and_generations(module, datamodule, tmp_path / "after")
    assert after < before - 0.05, (before, after)
    assert len(samples) == 4
    assert sum(extract_math_answer(sample["generation"]) is not None for sample in samples) >= 3, samples
