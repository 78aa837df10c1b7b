"""Guide 000's default model trained from scratch on a small set: BatchNorm's running statistics
start from a training batch (not from variance 1, which behind a depthwise convolution is ~10^4
times the real one and made evaluation predict one class), and a notice names --pretrained and a
small model when a large model is trained from scratch on few images."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAST
from torch import nn

import gpu_train
from common import checkpoint as ck
from common.data.images import ImageDataset, eval_transform, list_images
from common.models import build_model, calibrate_batchnorm, model_from_spec


def run(dataset: Path, out: Path, *extra: str) -> list[str]:
    assert gpu_train.main(["--data-dir", str(dataset), "--output", str(out), *FAST, "--epochs", "1",
                           *extra]) == 0
    return (out / "training.log").read_text(encoding="utf-8").splitlines()


def scratch_notices(lines: list[str]) -> list[str]:
    return [line for line in lines if "notice:" in line and "from scratch" in line]


def batchnorms(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def record_inputs(layers: dict[str, nn.Module], seen: dict[str, torch.Tensor]) -> list:
    """Forward hooks that keep each layer's first input (returning None: the output stays)."""
    def hook(name):
        def keep(module, inputs, output) -> None:
            seen.setdefault(name, inputs[0].detach().clone())
        return keep
    return [m.register_forward_hook(hook(n)) for n, m in layers.items()]


def test_calibrate_batchnorm_takes_the_batch_statistics_and_restores_the_model():
    torch.manual_seed(0)
    model, _ = build_model("torchvision/mobilenet_v3_small", 2)
    model.eval()
    layers = batchnorms(model)
    seen: dict[str, torch.Tensor] = {}
    hooks = record_inputs(layers, seen)
    x = torch.randn(8, 3, 32, 32)
    assert calibrate_batchnorm(model, x) == len(layers) > 20
    for hook in hooks:
        hook.remove()
    assert not model.training and not any(m.training for m in model.modules())
    for name, bn in layers.items():
        assert bn.momentum == 0.01  # torchvision's MobileNetV3 value, put back
        inputs = seen[name]
        assert torch.allclose(bn.running_mean, inputs.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-6)
        assert torch.allclose(bn.running_var, inputs.var(dim=(0, 2, 3), unbiased=True), rtol=1e-3, atol=1e-9)


def _running_to_real_variance(checkpoint: Path, images: list[Path]) -> list[float]:
    """Per BatchNorm layer: median over channels of running variance / the variance its input
    really has on these images in training mode."""
    ckpt = ck.load_checkpoint(checkpoint)
    model = model_from_spec(ckpt["model"])
    ck.load_state_dict_checked(model, ckpt["state_dict"], str(checkpoint))
    dataset = ImageDataset([(str(p), 0) for p in images], eval_transform(ckpt["preprocessing"]))
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    layers = batchnorms(model)
    running = {n: m.running_var.clone() for n, m in layers.items()}
    inputs: dict[str, torch.Tensor] = {}
    hooks = record_inputs(layers, inputs)
    model.train()
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return [(running[n] / inputs[n].var(dim=(0, 2, 3)).clamp_min(1e-12)).median().item() for n in layers]


def test_a_depthwise_model_from_scratch_evaluates_with_real_statistics(dataset, tmp_path):
    """Without the fix every running variance is still ~1 after the few steps of a small set,
    thousands of times the real one in the depthwise layers (evaluation then predicts one class)."""
    out = tmp_path / "mobilenet"
    lines = run(dataset, out, "--model", "torchvision/mobilenet_v3_small")
    assert any("batch norm: running statistics of 34 layers start from a training batch of 8" in line
               for line in lines)
    ratios = _running_to_real_variance(out / "best_model.pth", list_images(dataset / "train"))
    assert len(ratios) == 34
    assert max(ratios) < 20, sorted(ratios)[-3:]
    assert scratch_notices(lines) == []  # 1.5M parameters: not a large model


def test_the_notice_for_a_large_model_from_scratch_on_few_images(dataset, tmp_path):
    pytest.importorskip("timm")
    lines = run(dataset, tmp_path / "big", "--model", "resnet10t")
    notices = scratch_notices(lines)
    assert len(notices) == 1, notices
    notice = notices[0]
    assert "resnet10t (4.9M parameters) is trained from scratch on 32 images (about 16 per class)" in notice
    assert "--pretrained" in notice and "--model small_cnn" in notice
    model_line = next(i for i, line in enumerate(lines) if " model: " in line)
    assert lines.index(notice) == model_line + 1  # right under the model line, before epoch 1
    # starting from weights (here: that run's) is not from scratch
    again = run(dataset, tmp_path / "again", "--model", "resnet10t", "--weights",
                str(tmp_path / "big" / "best_model.pth"))
    assert scratch_notices(again) == []
    assert not any("batch norm: running statistics" in line for line in again)


def test_no_notice_for_small_cnn(dataset, tmp_path):
    lines = run(dataset, tmp_path / "small")
    assert scratch_notices(lines) == []
    assert any(" model: small_cnn (local)" in line for line in lines)


def test_no_notice_with_pretrained(dataset, tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    real = timm.create_model
    asked = []

    def create(name, pretrained=False, **kwargs):  # no network here: the weights stay random
        asked.append(pretrained)
        return real(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", create)
    lines = run(dataset, tmp_path / "pre", "--model", "resnet10t", "--pretrained")
    assert asked[0] is True
    assert scratch_notices(lines) == []
    assert not any("batch norm: running statistics" in line for line in lines)


def test_the_notice_threshold_is_per_class():
    from common.classify import FEW_IMAGES_PER_CLASS, scratch_notice

    big = nn.Linear(1500, 1500)  # 2.25M parameters
    assert scratch_notice(big, "big", FEW_IMAGES_PER_CLASS * 3 - 1, 3)
    assert scratch_notice(big, "big", FEW_IMAGES_PER_CLASS * 3, 3) is None
    assert scratch_notice(nn.Linear(1000, 1000), "small", 10, 3) is None  # 1.0M parameters


def test_a_head_scaled_for_1000_classes_is_reinitialised():
    pytest.importorskip("timm")
    from common.models import tame_head

    model, _ = build_model("efficientnet_b0", 2)
    assert model.classifier.weight.abs().max() > 0.5  # timm's +-1/sqrt(2)
    message = tame_head(model)
    assert message and "'classifier' re-initialised at +-0.028" in message
    assert model.classifier.weight.abs().max() <= 1 / 1280 ** 0.5
    resnet, _ = build_model("resnet10t", 2)  # already initialised as a plain Linear: left alone
    before = resnet.fc.weight.clone()
    assert tame_head(resnet) is None and torch.equal(resnet.fc.weight, before)


def test_the_guide_default_model_starts_at_a_sane_loss(dataset, tmp_path):
    """efficientnet_b0 from scratch on 2 classes: its first epoch's loss was about 5 (ln 2 = 0.69)."""
    pytest.importorskip("timm")
    import csv

    out = tmp_path / "effnet"
    lines = run(dataset, out, "--model", "efficientnet_b0", "--lr", "0.001")
    assert any("classifier layer 'classifier' re-initialised" in line for line in lines)
    with open(out / "metrics.csv", newline="") as fh:
        first = next(csv.DictReader(fh))
    assert float(first["train_loss"]) < 1.5, first


class _Fits(nn.Module):
    """A BatchNorm model that runs out of memory on batches larger than `limit` in training."""

    def __init__(self, limit: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.limit = limit

    def forward(self, x):
        if self.training and x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return self.bn(x)


@pytest.mark.parametrize("limit, used", [(8, 8), (3, 2), (0, 0)])
def test_the_batchnorm_start_fits_in_memory_or_is_left_out(limit, used):
    from common.classify import start_batchnorm

    model = _Fits(limit)
    inputs = torch.randn(8, 3, 4, 4) * 5 + 2
    messages: list[str] = []
    start_batchnorm(model, [(inputs, torch.zeros(8))], False, torch.device("cpu"), messages.append)
    assert len(messages) == 1
    if used:
        assert f"start from a training batch of {used} " in messages[0]
        torch.testing.assert_close(model.bn.running_mean, inputs[:used].mean((0, 2, 3)))
    else:
        assert "not even one image fits" in messages[0]
        assert torch.equal(model.bn.running_mean, torch.zeros(3))  # the usual start
