"""common/metrics.py and common/tasks.py: counts on the device, numbers at the end."""
from __future__ import annotations

import math

import pytest
import torch

from common.metrics import confusion_update, per_class_scores, topk_correct
from common.tasks import ClassificationTask

CPU = torch.device("cpu")


def test_topk_correct():
    logits = torch.tensor([[0.1, 0.5, 0.4],   # top1 = 1, top2 = {1, 2}
                           [0.9, 0.05, 0.05],  # top1 = 0
                           [0.2, 0.3, 0.5],   # top1 = 2, top2 = {2, 1}
                           [0.3, 0.3, 0.4]])  # top1 = 2
    targets = torch.tensor([2, 0, 0, 2])
    assert int(topk_correct(logits, targets, 1)) == 2
    assert int(topk_correct(logits, targets, 2)) == 3
    assert int(topk_correct(logits, targets, 3)) == 4
    assert int(topk_correct(logits, targets, 10)) == 4  # k larger than classes: everything
    assert topk_correct(logits, targets, 1).dim() == 0


def test_confusion_update_matches_hand_counts():
    matrix = torch.zeros(3, 3, dtype=torch.int64)
    confusion_update(matrix, torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]))
    confusion_update(matrix, torch.tensor([0, 0]), torch.tensor([1, 1]))
    expected = torch.tensor([[1, 0, 0],   # rows: true class, columns: predicted
                             [2, 1, 0],
                             [0, 1, 1]])
    assert torch.equal(matrix, expected)


def test_confusion_update_on_2d_inputs():
    matrix = torch.zeros(2, 2, dtype=torch.int64)
    preds = torch.tensor([[0, 1], [1, 1]])
    targets = torch.tensor([[0, 0], [1, 1]])
    confusion_update(matrix, preds, targets)
    assert matrix.tolist() == [[1, 1], [0, 2]]


def test_per_class_scores_on_a_known_matrix():
    matrix = torch.tensor([[5, 0, 0],
                           [2, 3, 0],
                           [1, 1, 0]])  # class 2 is never predicted
    scores = per_class_scores(matrix)
    assert scores["precision"] == pytest.approx([5 / 8, 3 / 4, 0.0])
    assert scores["recall"] == pytest.approx([1.0, 3 / 5, 0.0])
    p0, r0 = 5 / 8, 1.0
    p1, r1 = 3 / 4, 3 / 5
    assert scores["f1"] == pytest.approx([2 * p0 * r0 / (p0 + r0), 2 * p1 * r1 / (p1 + r1), 0.0])
    assert scores["support"] == [5, 5, 2]
    assert not any(math.isnan(v) for key in ("precision", "recall", "f1") for v in scores[key])


def test_per_class_scores_class_without_samples():
    matrix = torch.tensor([[3, 1], [0, 0]])  # class 1 never occurs but is predicted once
    scores = per_class_scores(matrix)
    assert scores["precision"] == pytest.approx([1.0, 0.0])
    assert scores["recall"] == pytest.approx([0.75, 0.0])
    assert scores["support"] == [4, 0]
    assert not any(math.isnan(v) for v in scores["f1"])


def run_task(num_classes: int, batches, train: bool):
    task = ClassificationTask(num_classes)
    totals = task.new_totals(CPU, train=train)
    for logits, targets in batches:
        loss = task.loss(logits, targets, train=train)
        task.accumulate(totals, logits, targets, loss)
    return task, totals


def test_classification_task_matches_hand_computation():
    torch.manual_seed(0)
    batches = [(torch.randn(5, 3), torch.randint(0, 3, (5,))),
               (torch.randn(3, 3), torch.randint(0, 3, (3,)))]
    task, totals = run_task(3, batches, train=False)
    metrics = task.summarize(totals)

    logits = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    expected_loss = torch.nn.functional.cross_entropy(logits, targets).item()
    expected_acc = (logits.argmax(1) == targets).float().mean().item()
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert metrics["acc"] == pytest.approx(expected_acc)
    assert int(totals["count"]) == 8
    assert int(totals["confusion"].sum()) == 8
    assert int(totals["confusion"].diag().sum()) == int(totals["correct"])
    expected_matrix = torch.zeros(3, 3, dtype=torch.int64)
    for t, p in zip(targets.tolist(), logits.argmax(1).tolist(), strict=True):
        expected_matrix[t, p] += 1
    assert torch.equal(totals["confusion"], expected_matrix)
    assert "top5" not in metrics  # only 3 classes


def test_top5_only_with_more_than_five_classes():
    torch.manual_seed(1)
    logits, targets = torch.randn(20, 7), torch.randint(0, 7, (20,))
    task, totals = run_task(7, [(logits, targets)], train=False)
    metrics = task.summarize(totals)
    top5 = (logits.topk(5, dim=1).indices == targets[:, None]).any(1).float().mean().item()
    assert metrics["top5"] == pytest.approx(top5)
    assert metrics["top5"] >= metrics["acc"]
    _, five = run_task(5, [(torch.randn(4, 5), torch.randint(0, 5, (4,)))], train=False)
    assert "top5" not in five


def test_training_totals_have_no_confusion_matrix():
    task = ClassificationTask(7)
    totals = task.new_totals(CPU, train=True)
    assert set(totals) == {"loss_sum", "correct", "count"}
    assert totals["loss_sum"].dtype == torch.float64


def test_label_smoothing_only_in_training_loss():
    task = ClassificationTask(3, label_smoothing=0.2)
    logits = torch.tensor([[4.0, 0.0, 0.0]])
    target = torch.tensor([0])
    plain = torch.nn.functional.cross_entropy(logits, target)
    smooth = torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.2)
    assert task.loss(logits, target, train=False).item() == pytest.approx(plain.item())
    assert task.loss(logits, target, train=True).item() == pytest.approx(smooth.item())
    assert task.loss(logits.half(), target).dtype == torch.float32


def test_summarize_empty_totals_does_not_divide_by_zero():
    task = ClassificationTask(2)
    metrics = task.summarize(task.new_totals(CPU, train=False))
    assert metrics == {"loss": 0.0, "acc": 0.0}
