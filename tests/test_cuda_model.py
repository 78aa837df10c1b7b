"""The model on a real GPU (make test-gpu): channels_last during training (weights and inputs of every
convolution) with a checkpoint that loads on a CPU, and torch.compile on CUDA (the compiled model
trains, the checkpoint holds the plain model's names). Skipped without CUDA (tests/conftest.py)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FAST
from torch import nn

import gpu_train
import validate
from common.checkpoint import load_checkpoint, load_state_dict_checked
from common.models import model_from_spec
from common.models.small import SmallCNN

pytestmark = pytest.mark.cuda


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def train(dataset: Path, out: Path, *extra: str) -> int:
    return gpu_train.main(["--data-dir", str(dataset), "--output", str(out), *FAST, "--device", "cuda",
                           *extra])


def test_channels_last_in_training_and_the_checkpoint_loads_on_cpu(dataset, tmp_path):
    seen: list[tuple[bool, bool]] = []

    def hook(module, args):
        if isinstance(module, nn.Conv2d) and module.training and torch.is_grad_enabled():
            x = args[0]
            seen.append((x.is_cuda and x.is_contiguous(memory_format=torch.channels_last),
                         module.weight.is_contiguous(memory_format=torch.channels_last)))

    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    out = tmp_path / "o"
    try:
        assert train(dataset, out, "--epochs", "3") == 0  # --channels-last auto: on for CUDA
    finally:
        handle.remove()
    assert seen, "no convolution ran in training"
    assert all(inp for inp, _ in seen), "a convolution got an input that is not channels_last"
    assert all(w for _, w in seen), "a convolution's weight is not channels_last"

    # the saved weights load into a model on the CPU and compute what they computed on the GPU
    ckpt = load_checkpoint(out / "best_model.pth")
    assert all(t.device.type == "cpu" for t in ckpt["state_dict"].values())
    model = model_from_spec(ckpt["model"])
    load_state_dict_checked(model, ckpt["state_dict"], "best_model.pth")
    model.eval()
    x = torch.rand(4, 3, 32, 32)
    gpu = model_from_spec(ckpt["model"]).cuda().to(memory_format=torch.channels_last).eval()
    load_state_dict_checked(gpu, ckpt["state_dict"], "best_model.pth")
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            expected = gpu(x.cuda().contiguous(memory_format=torch.channels_last)).cpu()
            torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    # and validate.py evaluates it on the CPU
    results = tmp_path / "r.json"
    assert validate.main(["--model", str(out / "best_model.pth"), "--data-dir", str(dataset / "val"),
                          "--device", "cpu", "--results-file", str(results), "--num-workers", "0"]) == 0
    data = json.loads(results.read_text())
    assert data["images"] == 12 and data["metrics"]["acc"] > 0.75


def test_torch_compile_on_cuda_trains_and_saves_the_plain_names(dataset, tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    out = tmp_path / "o"
    assert train(dataset, out, "--epochs", "3", "--compile") == 0
    assert counters["stats"]["unique_graphs"] > graphs, "torch.compile captured no graph"
    rows = read_rows(out / "metrics.csv")
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)
    assert max(float(r["val_acc"]) for r in rows) > 0.75  # the compiled model learned
    plain = set(SmallCNN(2).state_dict())
    for name in ("best_model.pth", "checkpoint.pth"):
        keys = set(load_checkpoint(out / name)["state_dict"])
        assert keys == plain, (name, sorted(keys ^ plain)[:5])
    torch._dynamo.reset()
