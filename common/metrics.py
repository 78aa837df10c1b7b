"""Metrics accumulated on the device (no host sync per step) and turned into numbers once."""
from __future__ import annotations

import torch


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Number of samples whose target is among the k highest logits (a device scalar)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == targets.unsqueeze(1)).any(dim=1).sum()


def confusion_update(matrix: torch.Tensor, preds: torch.Tensor, targets: torch.Tensor) -> None:
    """Add a batch to a (C, C) confusion matrix, rows = true class, columns = prediction."""
    n = matrix.shape[0]
    cells = targets.reshape(-1) * n + preds.reshape(-1)
    # index_add_ into the known n*n cells, not bincount: bincount's output size depends on the
    # values, so on a GPU the host would wait for every validation batch
    matrix.view(-1).index_add_(0, cells, torch.ones_like(cells, dtype=matrix.dtype))


def per_class_scores(matrix: torch.Tensor) -> dict[str, list[float]]:
    """Precision, recall, F1 and support per class from a confusion matrix (0 where undefined)."""
    m = matrix.double()
    tp = m.diag()
    predicted = m.sum(dim=0)
    actual = m.sum(dim=1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    return {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
            "support": actual.long().tolist()}
