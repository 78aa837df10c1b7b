"""Tasks: what a batch is, the loss, and the metrics summed on the device.

The engine knows nothing about classification; a new kind of problem is a new task here.
"""
from __future__ import annotations

import torch
from torch import nn

from .metrics import confusion_update, topk_correct


class ClassificationTask:
    name = "classification"
    monitor = "acc"  # validation metric that picks the best model (higher is better)

    def __init__(self, num_classes: int, label_smoothing: float = 0.0):
        self.num_classes = num_classes
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.eval_criterion = nn.CrossEntropyLoss()

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, train: bool = True) -> torch.Tensor:
        criterion = self.criterion if train else self.eval_criterion
        return criterion(outputs.float(), targets)

    def new_totals(self, device: torch.device, train: bool) -> dict[str, torch.Tensor]:
        totals = {"loss_sum": torch.zeros((), device=device, dtype=torch.float64),
                  "correct": torch.zeros((), device=device, dtype=torch.int64),
                  "count": torch.zeros((), device=device, dtype=torch.int64)}
        if not train:
            c = self.num_classes
            totals["confusion"] = torch.zeros((c, c), device=device, dtype=torch.int64)
            if c > 5:
                totals["top5"] = torch.zeros((), device=device, dtype=torch.int64)
        return totals

    def accumulate(self, totals: dict[str, torch.Tensor], outputs: torch.Tensor,
                   targets: torch.Tensor, loss: torch.Tensor) -> None:
        """Add one batch to the running totals, on the device, without a host sync."""
        preds = outputs.argmax(dim=1)
        totals["loss_sum"] += loss.detach().double() * targets.shape[0]
        totals["correct"] += (preds == targets).sum()
        totals["count"] += targets.shape[0]
        if "confusion" in totals:
            confusion_update(totals["confusion"], preds, targets)
        if "top5" in totals:
            totals["top5"] += topk_correct(outputs, targets, 5)

    @staticmethod
    def summarize(totals: dict[str, torch.Tensor]) -> dict[str, float]:
        count = max(int(totals["count"]), 1)
        metrics = {"loss": float(totals["loss_sum"]) / count,
                   "acc": float(totals["correct"]) / count}
        if "top5" in totals:
            metrics["top5"] = float(totals["top5"]) / count
        return metrics
