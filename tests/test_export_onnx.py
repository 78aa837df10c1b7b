"""export_onnx.py: a trained checkpoint to ONNX, checked in onnxruntime; metadata, batch axes,
input size, old opsets, and the errors (tolerance, unsupported operator, bad or unsafe files)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import FAST, make_folder
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument
from torch import nn

import export_onnx
import gpu_train
from common import export
from common import models as models_mod
from common.checkpoint import VERSION, atomic_save, load_checkpoint, make_payload
from common.data import segmentation as seg
from common.data.images import eval_transform, load_rgb, preprocessing
from common.inference import load_for_inference


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """One tiny small_cnn checkpoint, exported once with the default flags."""
    root = tmp_path_factory.mktemp("export")
    make_folder(root / "data" / "train", per_class=8, seed=1)
    make_folder(root / "data" / "val", per_class=4, seed=2)
    out = root / "out"
    assert gpu_train.main(["--data-dir", str(root / "data"), "--output", str(out), *FAST,
                           "--epochs", "1"]) == 0
    onnx_file = root / "model.onnx"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = export_onnx.main(["--model", str(out / "best_model.pth"), "--output", str(onnx_file)])
    assert code == 0, stderr.getvalue()
    return {"root": root, "ckpt": out / "best_model.pth", "onnx": onnx_file, "data": root / "data",
            "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_export_writes_a_checked_file_with_metadata(trained):
    path = trained["onnx"]
    assert path.is_file() and not list(path.parent.glob(".model.onnx.*"))  # no temp folder left
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    ckpt = load_checkpoint(trained["ckpt"])
    assert json.loads(meta["classes"]) == ckpt["classes"] == ["bottom", "top"]
    assert json.loads(meta["mean"]) == ckpt["preprocessing"]["mean"]
    assert json.loads(meta["std"]) == ckpt["preprocessing"]["std"]
    assert (meta["img_size"], meta["channels"], meta["task"]) == ("32", "3", "classification")
    assert (meta["model_name"], meta["model_source"]) == ("small_cnn", "local")
    assert meta["format_version"] == str(VERSION) and meta["opset"] == "18"
    assert json.loads(meta["preprocessing"]) == ckpt["preprocessing"]
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert dims(model.graph.input[0]) == ["batch", 3, 32, 32]
    assert next(o.version for o in model.opset_import if o.domain == "") == 18
    printed = trained["stdout"]
    assert f"exported: {path}" in printed and "opset 18" in printed
    assert "at batch 1" in printed and "at batch 4" in printed and "metadata: " in printed
    # a clean console: no exporter progress lines, warnings or tracebacks
    assert "[torch.onnx]" not in printed and trained["stderr"] == ""


def test_onnxruntime_matches_pytorch_on_a_real_image(trained):
    loaded = load_for_inference(trained["ckpt"], torch.device("cpu"))
    transform = eval_transform(loaded.preprocessing)
    images = sorted((trained["data"] / "val").rglob("*.png"))
    batch = torch.stack([transform(load_rgb(p)) for p in images[:3]])
    with torch.no_grad():
        expected = loaded.model(batch).numpy()
    got = session(trained["onnx"]).run(None, {"input": batch.numpy()})[0]
    assert got.shape == (3, 2)  # the dynamic batch axis takes 3
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert (got.argmax(1) == expected.argmax(1)).all()
    one = session(trained["onnx"]).run(None, {"input": batch[:1].numpy()})[0]
    np.testing.assert_allclose(one, expected[:1], atol=1e-4, rtol=0)


def test_static_batch_and_old_opset(trained, tmp_path, capfd):
    """--static-batch fixes the batch at 1; --opset 17 goes through the TorchScript-based exporter."""
    out = tmp_path / "static.onnx"
    assert export_onnx.main(["--model", str(trained["ckpt"]), "--output", str(out), "--static-batch",
                             "--opset", "17"]) == 0
    captured = capfd.readouterr()  # file descriptors too: what C++ writes is caught as well
    assert "TorchScript-based exporter" in captured.out and "at batch 4" not in captured.out
    assert captured.err == ""  # its DeprecationWarning stays off the console
    model = onnx.load(str(out))
    assert dims(model.graph.input[0]) == [1, 3, 32, 32]
    assert next(o.version for o in model.opset_import if o.domain == "") == 17
    s = session(out)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loaded = load_for_inference(trained["ckpt"], torch.device("cpu"))
    with torch.no_grad():
        expected = loaded.model(x).numpy()
    got = s.run(None, {"input": x.numpy()})[0]
    assert got.shape == (1, 2)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    with pytest.raises(InvalidArgument, match="(?i)dimension|shape"):
        s.run(None, {"input": np.zeros((2, 3, 32, 32), np.float32)})


def test_resnet18_with_img_size_override(tmp_path, capsys):
    """A torchvision model; --img-size replaces the checkpoint's 64 with 32 in graph and metadata."""
    model, spec = models_mod.build_model("torchvision/resnet18", 3)
    payload = make_payload(model, task="classification", model_spec=spec,
                           meta={"classes": ["a", "b", "c"], "preprocessing": preprocessing(64)},
                           metrics={}, config={})
    ckpt = tmp_path / "resnet18.pth"
    atomic_save(payload, ckpt)
    out = tmp_path / "resnet18.onnx"
    assert export_onnx.main(["--model", str(ckpt), "--output", str(out), "--img-size", "32"]) == 0
    assert "max |diff|" in capsys.readouterr().out
    model_proto = onnx.load(str(out))
    assert dims(model_proto.graph.input[0]) == ["batch", 3, 32, 32]
    meta = {p.key: p.value for p in model_proto.metadata_props}
    assert meta["img_size"] == "32" and meta["model_source"] == "torchvision"
    assert json.loads(meta["preprocessing"])["resize_size"] == 37  # 64 -> 73 scaled to 32, as training does
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    got = session(out).run(None, {"input": x})[0]
    assert got.shape == (2, 3)
    with torch.no_grad():
        expected = load_for_inference(ckpt, torch.device("cpu")).model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_outputs_above_tolerance_are_an_error_and_keep_the_old_file(trained, tmp_path, capsys, monkeypatch):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the user's earlier export")
    real = export.torch_outputs
    monkeypatch.setattr(export, "torch_outputs", lambda model, x: real(model, x) + 0.01)
    capsys.readouterr()
    assert export_onnx.main(["--model", str(trained["ckpt"]), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: onnxruntime and PyTorch outputs differ by up to 0.01")
    assert "above --atol 0.0001" in err and "larger --atol" in err and err.count("\n") == 1
    assert out.read_bytes() == b"the user's earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # temp folder removed


@pytest.mark.parametrize("bilinear, opset", [(False, 18), (True, 18), (False, 17)])
def test_a_unet_exports_with_the_logits_pytorch_gives(tmp_path, capsys, bilinear, opset):
    """A segmentation checkpoint (U-Net of width 8, either upsampling, batch-norm statistics away from
    their defaults), by either exporter: onnxruntime's per-pixel class logits equal PyTorch's at a
    batch of 3, at the example's size and at another, odd, non-square one (the U-Net takes any size,
    and so does its ONNX file: dynamic height and width)."""
    model, spec = models_mod.build_model("unet", 2, bilinear=bilinear, base=8)
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=gen))
            module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=gen))
    payload = make_payload(model, task="segmentation", model_spec=spec,
                           meta={"mask_values": [0, 255], "classes": ["0", "255"],
                                 "preprocessing": seg.preprocessing(1.0)}, metrics={}, config={})
    ckpt = tmp_path / "unet.pth"
    atomic_save(payload, ckpt)
    out = tmp_path / "unet.onnx"
    assert export_onnx.main(["--model", str(ckpt), "--output", str(out), "--img-size", "32",
                             "--opset", str(opset)]) == 0
    printed = capsys.readouterr().out
    assert "at batch 4, " in printed and "at batch 1 at 19x37 (atol" in printed  # the check ran both
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["task"] == "segmentation" and json.loads(meta["mask_values"]) == [0, 255]
    assert meta["img_size"] == "any" and "any height and width of at least 16 px" in meta["input_format"]
    assert dims(proto.graph.input[0]) == ["batch", 3, "height", "width"]
    reference = load_for_inference(ckpt, torch.device("cpu"), tasks=("segmentation",)).model
    for shape in ((3, 3, 32, 32), (3, 3, 45, 27)):
        x = torch.rand(*shape, generator=gen)
        got = session(out).run(None, {"input": x.numpy()})[0]
        assert got.shape == (3, 2, *shape[2:])  # a class map per pixel of the input
        with torch.no_grad():
            expected = reference(x).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
        assert (got.argmax(1) == expected.argmax(1)).mean() > 0.999  # the same masks


class CumMaxNet(nn.Module):
    """A classifier whose forward uses torch.cummax, which the ONNX exporter cannot translate."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.head = nn.Linear(3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cummax(x.flatten(2), dim=2)[0][:, :, -1]
        return self.head(pooled)


@pytest.mark.parametrize("opset", ["18", "17"])  # torch.export-based and TorchScript-based exporters
def test_unsupported_operator_is_one_line_naming_it(opset, tmp_path, capfd, monkeypatch):
    monkeypatch.setitem(models_mod.LOCAL_MODELS, "cummax_net", CumMaxNet)
    spec = {"name": "cummax_net", "source": "local", "kwargs": {"num_classes": 2}}
    payload = make_payload(CumMaxNet(2), task="classification", model_spec=spec,
                           meta={"classes": ["x", "y"], "preprocessing": preprocessing(16)},
                           metrics={}, config={})
    atomic_save(payload, tmp_path / "cummax.pth")
    out = tmp_path / "cummax.onnx"
    capfd.readouterr()
    assert export_onnx.main(["--model", str(tmp_path / "cummax.pth"), "--output", str(out),
                             "--opset", opset]) == 2
    captured = capfd.readouterr()  # file descriptors too: the TorchScript exporter's C++ graph dump
    assert captured.err.startswith("error: cannot export cummax_net: operator aten::cummax is not supported "
                                   f"by the ONNX exporter at opset {opset}; try another --opset")
    assert captured.err.count("\n") == 1
    assert "Traceback" not in captured.out + captured.err and "[torch.onnx]" not in captured.out
    assert "graph" not in captured.out + captured.err.split(" (exporter:")[0]
    assert not out.exists()


def test_unsupported_operator_names_from_exporter_messages():
    dynamo = ("<class 'DispatchError'>: No ONNX function found for <OpOverload(op='aten.linalg_eig', "
              "overload='default')>. Failure message: ...")
    node = "Error when translating node %h : [n=1] = call_function[target=torch.ops.aten.histc.default](...)"
    legacy = "Exporting the operator 'aten::cummax' to ONNX opset version 17 is not supported."
    assert export.unsupported_operator(dynamo) == "aten::linalg_eig"
    assert export.unsupported_operator(node) == "aten::histc"
    assert export.unsupported_operator(legacy) == "aten::cummax"
    assert export.unsupported_operator("something else went wrong") is None


def test_missing_and_truncated_checkpoints(trained, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert export_onnx.main(["--model", str(tmp_path / "nope.pth"), "--output", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    cut = tmp_path / "cut.pth"
    data = trained["ckpt"].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    assert export_onnx.main(["--model", str(cut), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {cut} is") and "Traceback" not in err
    assert not out.exists()


class Malicious:
    """Unpickling with full pickle calls `action(*args)`: here, something that creates a marker."""

    def __init__(self, action, *args):
        self.action, self.args = action, args

    def __reduce__(self):
        return (self.action, self.args)


@pytest.mark.parametrize("module", ["shutil", "os"])
def test_malicious_pickle_is_refused_without_running_it(module, tmp_path, capsys):
    marker = tmp_path / "pwned"
    (tmp_path / "src.txt").write_text("payload")
    action = Malicious(os.mkdir, str(marker)) if module == "os" else \
        Malicious(shutil.copyfile, str(tmp_path / "src.txt"), str(marker))
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": action}, evil)
    assert not marker.exists()
    out = tmp_path / "e.onnx"
    assert export_onnx.main(["--model", str(evil), "--output", str(out)]) == 2
    assert not marker.exists()
    err = capsys.readouterr().err
    assert not out.exists()
    # the payload is live: trusting it runs the code (then fails, as it holds no model)
    assert export_onnx.main(["--model", str(evil), "--output", str(out), "--trust-checkpoint"]) == 2
    assert marker.exists()
    assert err.startswith("error: ") and "--trust-checkpoint" in err


def test_plain_state_dict_with_arch_and_num_classes(trained, tmp_path, capsys):
    weights = tmp_path / "weights.pth"
    torch.save({f"module.{k}": v for k, v in load_checkpoint(trained["ckpt"])["state_dict"].items()}, weights)
    out = tmp_path / "plain.onnx"
    assert export_onnx.main(["--model", str(weights), "--output", str(out)]) == 2
    assert "--arch" in capsys.readouterr().err
    assert export_onnx.main(["--model", str(weights), "--output", str(out), "--arch", "small_cnn",
                             "--num-classes", "2", "--img-size", "32", "--static-batch"]) == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["classes"]) == ["0", "1"] and meta["model_name"] == "small_cnn"
    x = torch.randn(1, 3, 32, 32)
    loaded = load_for_inference(trained["ckpt"], torch.device("cpu"))
    with torch.no_grad():
        expected = loaded.model(x).numpy()
    np.testing.assert_allclose(session(out).run(None, {"input": x.numpy()})[0], expected, atol=1e-4, rtol=0)
