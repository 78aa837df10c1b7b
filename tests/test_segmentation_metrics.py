"""Dice, IoU and the soft Dice loss against values computed by hand (not against the same
function on the other side): a wrong denominator or a background class counted in the mean
must fail here."""
from __future__ import annotations

import math

import pytest
import torch

from common.tasks import SegmentationTask, dice_iou_per_image, soft_dice_loss

FOREGROUND = range(1, 2)


def masks(*rows: str) -> torch.Tensor:
    """One image from rows of digits, e.g. masks("110", "000") -> a (1, 2, 3) long tensor."""
    return torch.tensor([[int(c) for c in row] for row in rows]).unsqueeze(0)


def test_two_predicted_three_true_one_shared():
    pred = masks("1100", "0000")
    true = masks("0111", "0000")  # overlap: one pixel (column 1)
    dice, iou = dice_iou_per_image(pred, true, FOREGROUND)
    assert dice.item() == pytest.approx(2 * 1 / (2 + 3)) == pytest.approx(0.4)
    assert iou.item() == pytest.approx(1 / (2 + 3 - 1)) == pytest.approx(0.25)


def test_both_empty_is_a_perfect_match():
    dice, iou = dice_iou_per_image(masks("000", "000"), masks("000", "000"), FOREGROUND)
    assert (dice.item(), iou.item()) == (1.0, 1.0)


def test_empty_prediction_of_a_present_object_scores_zero():
    dice, iou = dice_iou_per_image(masks("000"), masks("011"), FOREGROUND)
    assert (dice.item(), iou.item()) == (0.0, 0.0)
    dice, iou = dice_iou_per_image(masks("011"), masks("000"), FOREGROUND)  # and the other way round
    assert (dice.item(), iou.item()) == (0.0, 0.0)


def test_per_image_values_in_a_batch():
    pred = torch.cat([masks("1100"), masks("1111"), masks("0000")])
    true = torch.cat([masks("0111"), masks("1111"), masks("0000")])
    dice, iou = dice_iou_per_image(pred, true, FOREGROUND)
    assert dice.tolist() == pytest.approx([0.4, 1.0, 1.0])
    assert iou.tolist() == pytest.approx([0.25, 1.0, 1.0])


def test_multi_class_is_the_mean_over_foreground_classes_only():
    # class 1: pred 2 px, true 2 px, overlap 1 -> Dice 0.5, IoU 1/3
    # class 2: pred 1 px, true 2 px, overlap 1 -> Dice 2/3, IoU 1/2
    # background (0) is badly predicted but must not count
    pred = masks("1120", "0000")
    true = masks("0122", "1000")
    dice, iou = dice_iou_per_image(pred, true, range(1, 3))
    assert dice.item() == pytest.approx((0.5 + 2 / 3) / 2)
    assert iou.item() == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_segmentation_task_averages_over_images():
    """Two images of Dice 0.4 and 1.0 give 0.7, not the pixel-pooled Dice."""
    task = SegmentationTask(num_classes=2)
    true = torch.cat([masks("0111"), masks("1111")])
    # logits whose argmax is the prediction 1100 / 1111
    pred = torch.cat([masks("1100"), masks("1111")])
    logits = torch.nn.functional.one_hot(pred, 2).permute(0, 3, 1, 2).float() * 5
    totals = task.new_totals(torch.device("cpu"), train=False)
    task.accumulate(totals, logits, true, torch.tensor(0.5))
    result = task.summarize(totals)
    assert result["dice"] == pytest.approx((0.4 + 1.0) / 2)
    assert result["iou"] == pytest.approx((0.25 + 1.0) / 2)
    assert result["loss"] == pytest.approx(0.5)


def test_one_class_models_threshold_the_logit_at_zero():
    task = SegmentationTask(num_classes=1)
    logits = torch.tensor([[[[2.0, -1.0, 0.5, -3.0]]]])  # (1, 1, 1, 4)
    assert task.predictions(logits).tolist() == [[[1, 0, 1, 0]]]


def test_soft_dice_loss_at_a_known_input():
    # one image, one channel, probabilities 0.5 0.5 1 0 against truth 1 0 1 1:
    # intersection 0.5 + 1 = 1.5, sums 2 + 3 = 5 -> soft Dice 3/5, loss 0.4
    probs = torch.tensor([[[[0.5, 0.5], [1.0, 0.0]]]])
    truth = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
    assert soft_dice_loss(probs, truth, eps=0.0).item() == pytest.approx(0.4)
    assert soft_dice_loss(truth, truth).item() == pytest.approx(0.0, abs=1e-6)


def test_soft_dice_loss_is_the_mean_over_channels_and_images():
    # channel 0 soft Dice 1 (perfect), channel 1 soft Dice 0 (disjoint): mean 0.5, loss 0.5
    probs = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    truth = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]]])
    assert soft_dice_loss(probs, truth, eps=0.0).item() == pytest.approx(0.5)


def test_the_segmentation_loss_is_cross_entropy_plus_soft_dice():
    task = SegmentationTask(num_classes=2)
    logits = torch.tensor([[[[1.0, -1.0]], [[0.0, 2.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    p = logits.softmax(dim=1)
    ce = -(math.log(p[0, 0, 0, 0]) + math.log(p[0, 1, 0, 1])) / 2
    one_hot = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    inter = (p * one_hot).sum((2, 3))
    dice = ((2 * inter + 1e-6) / (p.sum((2, 3)) + one_hot.sum((2, 3)) + 1e-6)).mean()
    assert task.loss(logits, target).item() == pytest.approx(ce + 1 - dice.item(), rel=1e-6)
