"""Tasks: what a batch is, the loss, and the metrics summed on the device.

The engine knows nothing about classification; a new kind of problem is a new task here.
"""
from __future__ import annotations

import torch
from torch import nn

from .metrics import confusion_update, topk_correct
from .mixing import hard_labels


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
        """Add one batch to the running totals, on the device, without a host sync. Mixed targets
        (MixUp/CutMix, one row of class weights per sample) count their dominant class."""
        preds = outputs.argmax(dim=1)
        targets = hard_labels(targets)
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


def soft_dice_loss(probs: torch.Tensor, one_hot: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """1 - mean soft Dice over images and channels (the differentiable part of the loss)."""
    dims = (2, 3)
    inter = (probs * one_hot).sum(dims)
    total = probs.sum(dims) + one_hot.sum(dims)
    return 1 - ((2 * inter + eps) / (total + eps)).mean()


def dice_iou_per_image(pred: torch.Tensor, target: torch.Tensor, classes: range
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard Dice and IoU per image, averaged over `classes` (foreground). A class absent from
    both prediction and truth counts as a perfect match (1), so empty masks are not penalised."""
    dice, iou = [], []
    for c in classes:
        p, t = pred == c, target == c
        inter = (p & t).sum((1, 2)).double()
        p_sum, t_sum = p.sum((1, 2)).double(), t.sum((1, 2)).double()
        union = p_sum + t_sum - inter
        empty = (p_sum + t_sum) == 0
        dice.append(torch.where(empty, 1.0, 2 * inter / (p_sum + t_sum).clamp(min=1)))
        iou.append(torch.where(empty, 1.0, inter / union.clamp(min=1)))
    return torch.stack(dice).mean(0), torch.stack(iou).mean(0)


class SegmentationTask:
    """Per-pixel classes. Loss: cross-entropy + soft Dice (BCE + Dice with one class).
    Metric: Dice per image, averaged over images (multi-class: mean over foreground classes),
    and IoU the same way. The best model is the one with the highest validation Dice."""

    name = "segmentation"
    monitor = "dice"

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        if self.num_classes == 1:
            return (logits[:, 0] > 0).long()
        return logits.argmax(dim=1)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, train: bool = True) -> torch.Tensor:
        logits = outputs.float()
        if self.num_classes == 1:
            truth = targets.float()
            bce = nn.functional.binary_cross_entropy_with_logits(logits[:, 0], truth)
            return bce + soft_dice_loss(torch.sigmoid(logits), truth.unsqueeze(1))
        one_hot = nn.functional.one_hot(targets, self.num_classes).permute(0, 3, 1, 2).float()
        ce = nn.functional.cross_entropy(logits, targets)
        return ce + soft_dice_loss(logits.softmax(dim=1), one_hot)

    def new_totals(self, device: torch.device, train: bool) -> dict[str, torch.Tensor]:
        zeros = {"dtype": torch.float64, "device": device}
        return {"loss_sum": torch.zeros((), **zeros), "dice_sum": torch.zeros((), **zeros),
                "iou_sum": torch.zeros((), **zeros),
                "count": torch.zeros((), device=device, dtype=torch.int64)}

    def accumulate(self, totals: dict[str, torch.Tensor], outputs: torch.Tensor,
                   targets: torch.Tensor, loss: torch.Tensor) -> None:
        foreground = range(1, max(self.num_classes, 2))
        dice, iou = dice_iou_per_image(self.predictions(outputs), targets, foreground)
        totals["loss_sum"] += loss.detach().double() * targets.shape[0]
        totals["dice_sum"] += dice.sum()
        totals["iou_sum"] += iou.sum()
        totals["count"] += targets.shape[0]

    @staticmethod
    def summarize(totals: dict[str, torch.Tensor]) -> dict[str, float]:
        count = max(int(totals["count"]), 1)
        return {"loss": float(totals["loss_sum"]) / count, "dice": float(totals["dice_sum"]) / count,
                "iou": float(totals["iou_sum"]) / count}


class SeriesTask(ClassificationTask):
    """Behaviour classification of sensor windows: a batch is (N, C, T) windows and labels; loss
    and metrics are those of image classification, the checkpoint says "timeseries"."""

    name = "timeseries"


TASKS = {"classification": ClassificationTask, "segmentation": SegmentationTask, "timeseries": SeriesTask}
