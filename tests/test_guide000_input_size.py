"""A model made for one input size (guide 000's vit_base_patch16_224) at another --img-size: timm's
are built for the size asked; one that cannot be is one line before the first epoch."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAST

import gpu_train
import validate
from common import checkpoint as ck
from common.models import build_model, model_from_spec

timm = pytest.importorskip("timm")


def train(dataset: Path, out: Path, *extra: str) -> int:
    return gpu_train.main(["--data-dir", str(dataset), "--output", str(out), *FAST, "--epochs", "1",
                           *extra])


def test_a_fixed_size_timm_model_is_built_for_the_size_asked():
    model, spec = build_model("vit_tiny_patch16_224", 2, img_size=64)
    assert spec["kwargs"] == {"num_classes": 2, "img_size": 64}
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 2)
    rebuilt = model_from_spec(spec)
    ck.load_state_dict_checked(rebuilt, model.state_dict(), "spec")
    # a model that takes any size keeps its spec as it was
    _, spec = build_model("resnet10t", 2, img_size=64)
    assert spec["kwargs"] == {"num_classes": 2}


def test_vit_trains_at_32_px_and_its_checkpoint_evaluates(dataset, tmp_path, capsys):
    out = tmp_path / "vit"
    assert train(dataset, out, "--model", "vit_tiny_patch16_224") == 0
    ckpt = ck.load_checkpoint(out / "best_model.pth")
    assert ckpt["model"]["kwargs"]["img_size"] == 32 and ckpt["preprocessing"]["img_size"] == 32
    capsys.readouterr()
    assert validate.main(["--model", str(out / "best_model.pth"), "--data-dir", str(dataset / "val"),
                          "--output-dir", str(tmp_path / "report"), "--num-workers", "0"]) == 0
    assert "images: 12" in capsys.readouterr().out


def test_a_model_that_cannot_take_the_size_is_one_line_before_the_first_epoch(dataset, tmp_path, capsys):
    """torchvision's ViT takes only the size it was built for."""
    out = tmp_path / "tv_vit"
    capsys.readouterr()
    assert train(dataset, out, "--model", "torchvision/vit_b_16") == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert lines == ["error: --img-size 32: vit_b_16 does not take 32 x 32 px inputs (Wrong image height! "
                     "Expected 224 but got 32!); use --img-size 224"]
    assert "Traceback" not in captured.out + captured.err and "epoch 1" not in captured.out
    assert not (out / "checkpoint.pth").exists()
