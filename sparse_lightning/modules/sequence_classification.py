"""Sequence classification and regression (GLUE) on any HF encoder, with the GLUE metric per task."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryF1Score, MatthewsCorrCoef, MulticlassAccuracy
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef
from transformers import AutoModelForSequenceClassification

from sparse_lightning.modules.base import SparseFineTuningModule

Metric = Literal["accuracy", "accuracy_f1", "matthews", "pearson_spearman"]


def build_metrics(metric: Metric, num_labels: int) -> MetricCollection:
    """GLUE's metric per task; accuracy is micro (torchmetrics defaults to a per-class macro average)."""
    if metric == "pearson_spearman":
        return MetricCollection({"pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef()})
    if metric == "matthews":
        return MetricCollection({"matthews": MatthewsCorrCoef(task="multiclass", num_classes=num_labels)})
    metrics: dict[str, Any] = {"accuracy": MulticlassAccuracy(num_classes=num_labels, average="micro")}
    if metric == "accuracy_f1":
        metrics["f1"] = BinaryF1Score()
    return MetricCollection(metrics)


class SequenceClassificationModule(SparseFineTuningModule):
    """Sequence classification or regression on any HF encoder, with the GLUE metric per task.

    `num_labels == 1` is regression (STS-B, float labels); several validation loaders (MNLI matched
    and mismatched) are reported separately under the datamodule's `val_set_names`.

    Args:
        model_name_or_path: the encoder (default: the offline all-MiniLM-L6-v2).
        num_labels: classes (1 = regression); default: the datamodule's task.
        metric: "accuracy", "accuracy_f1", "matthews" or "pearson_spearman"; default: the task's.
        label_names: class names in id order, written into the model config's id2label (and so the exported
            model's); default: the datamodule's `label_names` when it has them.
    """

    head_modules = ("classifier", "score")

    def __init__(self, model_name_or_path: str = "all-MiniLM-L6-v2", num_labels: int | None = None,
                 metric: Metric | None = None, label_names: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(model_name_or_path=model_name_or_path, **kwargs)
        if num_labels is not None and num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self._metrics: dict[tuple[str, int], MetricCollection] = {}

    def _task_from_datamodule(self) -> None:
        """Unset `num_labels`/`metric` come from the datamodule (GLUE knows its task); they are then
        saved with the hyper-parameters, so a checkpoint reloads without it."""
        datamodule = self.attached_datamodule
        for name, default in (("num_labels", 2), ("metric", "accuracy")):
            if self.hparams[name] is None:
                self.hparams[name] = getattr(datamodule, name, None) or default
        if self.hparams.get("label_names") is None and self.hparams.num_labels > 1:
            self.hparams["label_names"] = getattr(datamodule, "label_names", None)

    def build_model(self) -> nn.Module:
        self._task_from_datamodule()
        names = self.hparams.get("label_names")
        if names is not None and len(names) != self.hparams.num_labels:
            raise ValueError(f"label_names has {len(names)} names for num_labels={self.hparams.num_labels}")
        labels = {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}} if names else {}
        model = self.load_pretrained(AutoModelForSequenceClassification, self.hparams.model_name_or_path,
                                     num_labels=self.hparams.num_labels, **labels, **self.from_pretrained_kwargs)
        self.head_modules = tuple(name for name in type(self).head_modules if hasattr(model, name))
        return model

    def forward(self, batch: dict[str, Any]) -> Any:
        return self.model(**batch)

    def compute_loss(self, batch: dict[str, Any]) -> Tensor:
        return self(batch).loss

    def predictions(self, logits: Tensor) -> Tensor:
        return logits.squeeze(-1) if self.hparams.num_labels == 1 else logits.argmax(-1)

    def _evaluation_step(self, stage: str, batch: dict[str, Any], dataloader_idx: int) -> None:
        output = self(batch)
        prefix = self.metric_prefix(stage, dataloader_idx)
        self.log(f"{prefix}loss", output.loss, add_dataloader_idx=False, sync_dist=True)
        key = (stage, dataloader_idx)
        if key not in self._metrics:
            self._metrics[key] = build_metrics(self.hparams.metric, max(2, self.hparams.num_labels)).to(self.device)
        self._metrics[key].update(self.predictions(output.logits), batch["labels"])

    def _log_metrics(self, stage: str) -> None:
        for (metric_stage, idx), metrics in self._metrics.items():
            if metric_stage != stage:
                continue
            prefix = self.metric_prefix(stage, idx)
            self.log_dict({f"{prefix}{name}": value for name, value in metrics.compute().items()},
                          add_dataloader_idx=False, prog_bar=True)
            metrics.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step("val", batch, dataloader_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step("test", batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        batch = {k: v for k, v in batch.items() if k != "labels"}
        return self.predictions(self(batch).logits)
