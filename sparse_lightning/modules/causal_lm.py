"""Causal-LM fine-tuning (instruction, math, commonsense): response-only loss, generate-and-score evaluation.

Validation and test batches come in two kinds, told apart by their keys: `labels` (held-out loss, as
in training) and `answers` (left-padded prompts from a generation loader: the model generates, the
dataset's extraction rule scores, or `exact_match` when the batch says `scoring: exact_match`, and per-set
accuracy plus its mean is logged at epoch end). Training batches with `position_ids` are packed rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from sparse_lightning.borders.models import resolve_model_path
from sparse_lightning.eval import is_correct
from sparse_lightning.modes import eval_mode
from sparse_lightning.modules.base import SparseFineTuningModule

STAGES = ("val", "test")


def exact_match(generation: str, gold: str) -> bool:
    """Equal after collapsing whitespace and case-folding."""
    return " ".join(generation.split()).casefold() == " ".join(gold.split()).casefold()


class CausalLMModule(SparseFineTuningModule):
    """Any HF causal LM; logs `{stage}/{dataset}/accuracy` per generation set and `{stage}/accuracy_avg`.

    Generation is greedy (`num_beams=1`) or beam search, never sampled, so evaluations repeat exactly.
    `save_predictions=N` writes the first N generations of each set to
    `<log_dir>/predictions_<stage>_step<global_step>.jsonl` (rank 0) for inspection.

    Args:
        model_name_or_path: the causal LM (default: the offline SmolLM2-135M-Instruct).
        dtype: the dtype to load the model in (float32, bfloat16, float16); default: the checkpoint's.
        max_new_tokens: the longest generated answer in evaluation.
        num_beams: 1 for greedy decoding, more for beam search.
        save_predictions: how many generations per evaluation set to write for inspection.
    """

    def __init__(
        self,
        model_name_or_path: str = "SmolLM2-135M-Instruct",
        dtype: str | None = None,
        max_new_tokens: int = 256,
        num_beams: int = 1,
        save_predictions: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(model_name_or_path=model_name_or_path, **kwargs)
        if dtype is not None and not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype must name a torch dtype (float32, bfloat16, float16), got {dtype!r}")
        if max_new_tokens < 1 or num_beams < 1 or save_predictions < 0:
            raise ValueError(f"need max_new_tokens >= 1, num_beams >= 1, save_predictions >= 0; got "
                             f"{max_new_tokens}, {num_beams}, {save_predictions}")
        self._tokenizer: PreTrainedTokenizerBase | None = None
        # stage -> dataset -> [correct, total], and the kept sample generations
        self._counts: dict[str, dict[str, list[int]]] = {stage: {} for stage in STAGES}
        self._samples: dict[str, dict[str, list[dict[str, Any]]]] = {stage: {} for stage in STAGES}

    def build_model(self) -> nn.Module:
        dtype = getattr(torch, self.hparams.dtype) if self.hparams.dtype else None
        kwargs = self.from_pretrained_kwargs
        if dtype is not None:
            kwargs["dtype"] = dtype
        return self.load_pretrained(AutoModelForCausalLM, self.hparams.model_name_or_path, **kwargs)

    def forward(self, batch: dict[str, Any]) -> Any:
        if "position_ids" in batch:  # packed rows (datamodules.packing): positions restart per example, and with no
            # attention mask and no cache transformers builds the block-diagonal causal mask from them
            return self.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None,
                              use_cache=False, labels=batch["labels"])
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])

    def compute_loss(self, batch: dict[str, Any]) -> Tensor:
        """Mean next-token loss over labelled tokens: the datamodules label prompts -100, so response only."""
        return self(batch).loss

    # ------------------------------------------------------------------------------------------ generation

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The datamodule's tokenizer when it has one (same ids as the prompts), else the model's own."""
        datamodule = self.attached_datamodule
        if getattr(datamodule, "tokenizer", None) is not None:
            return datamodule.tokenizer
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(self.hparams.model_name_or_path))
            if self._tokenizer.pad_token is None:
                self._tokenizer.pad_token = self._tokenizer.eos_token
        return self._tokenizer

    def generation_kwargs(self) -> dict[str, Any]:
        """Deterministic decoding that stops at the EOS the datamodules append to every training response."""
        tokenizer = self.tokenizer
        return {
            "max_new_tokens": self.hparams.max_new_tokens,
            "num_beams": self.hparams.num_beams,
            "do_sample": False,
            "use_cache": True,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor) -> list[str]:
        """Continue each left-padded prompt and decode only the new tokens (works on PEFT and delta models).

        Runs in eval mode; every module gets back its own train/eval mode afterwards.
        """
        with eval_mode(self.model):
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **self.generation_kwargs())
        return self.tokenizer.batch_decode(output[:, input_ids.shape[1]:], skip_special_tokens=True)

    # ------------------------------------------------------------------------------------------ evaluation

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step("val", batch, dataloader_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step("test", batch, dataloader_idx)

    def on_validation_epoch_start(self) -> None:
        self._reset("val")

    def on_test_epoch_start(self) -> None:
        self._reset("test")

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy("val")

    def on_test_epoch_end(self) -> None:
        self._log_accuracy("test")

    def _reset(self, stage: str) -> None:
        self._counts[stage], self._samples[stage] = {}, {}

    def _evaluation_step(self, stage: str, batch: dict[str, Any], dataloader_idx: int) -> None:
        if "answers" in batch:
            self._score_generations(stage, batch)
        elif "labels" in batch:
            self.log(f"{self.metric_prefix(stage, dataloader_idx)}loss", self.compute_loss(batch), add_dataloader_idx=False,
                     sync_dist=True, batch_size=batch["input_ids"].shape[0])
        else:
            raise ValueError(f"a {stage} batch needs 'labels' (loss) or 'answers' (generation); got keys {list(batch)}")

    def _score_generations(self, stage: str, batch: dict[str, Any]) -> None:
        dataset = batch["dataset"]
        generations = self.generate(batch["input_ids"], batch["attention_mask"])
        if batch.get("scoring") == "exact_match":  # free text (datamodules.chat): the whole answer, normalised
            correct = [exact_match(text, gold) for text, gold in zip(generations, batch["answers"])]
        else:
            correct = [is_correct(dataset, text, gold) for text, gold in zip(generations, batch["answers"])]
        counts = self._counts[stage].setdefault(dataset, [0, 0])
        counts[0] += sum(correct)
        counts[1] += len(correct)
        samples = self._samples[stage].setdefault(dataset, [])
        for row in range(min(len(correct), self.hparams.save_predictions - len(samples))):
            prompt = self.tokenizer.decode(batch["input_ids"][row][batch["attention_mask"][row].bool()],
                                           skip_special_tokens=True)
            samples.append({"dataset": dataset, "prompt": prompt, "generation": generations[row],
                            "gold": batch["answers"][row], "correct": correct[row]})

    def _log_accuracy(self, stage: str) -> None:
        counts = self._counts[stage]
        names = list(dict.fromkeys([*self.loader_names(stage), *sorted(counts)]))
        if not names:
            return
        # Summed over ranks (same order everywhere: the datamodule's names first); sets with no example are skipped.
        totals = torch.tensor([counts.get(name, [0, 0]) for name in names], dtype=torch.long, device=self.device)
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        accuracies = {f"{stage}/{name}/accuracy": correct / total
                      for name, (correct, total) in zip(names, totals.tolist()) if total > 0}
        if not accuracies:
            return
        accuracies[f"{stage}/accuracy_avg"] = sum(accuracies.values()) / len(accuracies)
        self.log_dict(accuracies, add_dataloader_idx=False, prog_bar=True)
        if self.hparams.save_predictions and self.trainer.is_global_zero:
            self._write_predictions(stage)

    def _write_predictions(self, stage: str) -> None:
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"predictions_{stage}_step{self.global_step}.jsonl"
        with path.open("w", encoding="utf-8") as file:
            for samples in self._samples[stage].values():
                file.writelines(json.dumps(sample) + "\n" for sample in samples)
        rank_zero_info(f"wrote sample generations to {path}")
