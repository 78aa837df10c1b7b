"""Guide 000's model names: timm first for a bare name, timm/ and torchvision/ prefixes, the source
and parameter count in the run's first lines, and checkpoints that record torchvision still
rebuilding torchvision's model."""
from __future__ import annotations

import pytest
import torch
from conftest import FAST

import gpu_train
import validate
from common import checkpoint as ck
from common.errors import UserError
from common.models import build_model, model_from_spec, resolve_name

pytest.importorskip("timm")


@pytest.mark.parametrize("name, expected", [
    ("efficientnet_b0", ("timm", "efficientnet_b0")),        # the guide's table: timm's models
    ("vit_base_patch16_224", ("timm", "vit_base_patch16_224")),
    ("resnet50", ("timm", "resnet50")),
    ("timm/efficientnet_b0", ("timm", "efficientnet_b0")),
    ("torchvision/efficientnet_b0", ("torchvision", "efficientnet_b0")),
    ("vit_b_16", ("torchvision", "vit_b_16")),                 # only torchvision has it
    ("small_cnn", ("local", "small_cnn")),
])
def test_names_resolve_timm_first_and_prefixes_choose(name, expected):
    assert resolve_name(name) == expected


def test_prefixed_names_build_that_library_and_the_spec_is_bare():
    import timm.models.efficientnet as timm_effnet
    import torchvision

    model, spec = build_model("timm/efficientnet_b0", 2)
    assert isinstance(model, timm_effnet.EfficientNet)
    assert spec == {"name": "efficientnet_b0", "source": "timm", "kwargs": {"num_classes": 2}}
    model, spec = build_model("torchvision/efficientnet_b0", 2)
    assert isinstance(model, torchvision.models.EfficientNet)
    assert spec == {"name": "efficientnet_b0", "source": "torchvision", "kwargs": {"num_classes": 2}}


def test_unknown_names_speak_in_prefixes():
    with pytest.raises(UserError) as info:
        resolve_name("timm/vit_b_16")
    assert "timm has no 'vit_b_16'" in str(info.value) and "torchvision/vit_b_16" in str(info.value)
    with pytest.raises(UserError) as info:
        resolve_name("torchvision/efficientnet_b9")
    message = str(info.value)
    assert "Did you mean torchvision/efficientnet_b" in message and "--list-models" in message
    with pytest.raises(UserError) as info:
        resolve_name("efficientnet_b9")
    assert "timm/ or torchvision/" in str(info.value) and "--list-models" in str(info.value)


def test_unknown_model_fails_before_the_images_are_read(dataset, tmp_path, capsys):
    capsys.readouterr()
    code = gpu_train.main(["--data-dir", str(dataset), "--output", str(tmp_path / "o"), *FAST,
                           "--model", "timm/efficientnet_b9"])
    captured = capsys.readouterr()
    assert code == 2 and "error: unknown model 'timm/efficientnet_b9'" in captured.err
    assert "data:" not in captured.out


def test_list_models_names_the_order_and_the_prefixes(capsys):
    assert gpu_train.main(["--list-models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "local, timm, torchvision" in lines[0] and "torchvision/" in lines[0]
    sources = [line.split(" (")[0] for line in lines if not line.startswith(("a bare", " "))]
    assert sources == ["local", "timm", "torchvision"]
    shadowed = next(line for line in lines if line.startswith("  ") and "torchvision/" in line)
    assert "torchvision/efficientnet_b0" in shadowed and "torchvision/resnet18" in shadowed


def test_the_first_lines_name_the_library_and_the_parameters(dataset, tmp_path):
    out = tmp_path / "o"
    assert gpu_train.main(["--data-dir", str(dataset), "--output", str(out), *FAST, "--model", "resnet18",
                           "--epochs", "1"]) == 0
    lines = (out / "training.log").read_text(encoding="utf-8").splitlines()
    model_line = next(i for i, line in enumerate(lines) if " model: " in line)
    assert model_line < 10
    assert "model: resnet18 (timm; torchvision's: --model torchvision/resnet18), 11.18M parameters" \
        in lines[model_line]
    ckpt = ck.load_checkpoint(out / "best_model.pth")
    assert ckpt["model"]["source"] == "timm" and ckpt["model"]["name"] == "resnet18"


def test_a_checkpoint_that_records_torchvision_rebuilds_torchvision(dataset, tmp_path, capsys):
    """A checkpoint written when bare names went to torchvision keeps its model."""
    import torchvision

    from common.data.images import IMAGENET_MEAN, IMAGENET_STD, preprocessing

    torch.manual_seed(0)
    model = torchvision.models.get_model("efficientnet_b0", weights=None, num_classes=2).eval()
    spec = {"name": "efficientnet_b0", "source": "torchvision", "kwargs": {"num_classes": 2}}
    meta = {"classes": ["bottom", "top"], "preprocessing": preprocessing(32, IMAGENET_MEAN, IMAGENET_STD)}
    path = tmp_path / "old_best_model.pth"
    ck.atomic_save(ck.make_payload(model, task="classification", model_spec=spec, meta=meta,
                                   metrics={}, config={"model": "efficientnet_b0"}), path)
    rebuilt = model_from_spec(ck.load_checkpoint(path)["model"])
    assert isinstance(rebuilt, torchvision.models.EfficientNet)
    ck.load_state_dict_checked(rebuilt, ck.load_checkpoint(path)["state_dict"], str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(x), model(x), atol=1e-5)
    capsys.readouterr()
    assert validate.main(["--model", str(path), "--data-dir", str(dataset / "val"),
                          "--output-dir", str(tmp_path / "report"), "--num-workers", "0"]) == 0
    captured = capsys.readouterr()
    assert "images: 12" in captured.out and "Traceback" not in captured.err


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_a_plain_state_dict_with_a_bare_arch_finds_its_library(tmp_path, source):
    """torchvision and timm both have efficientnet_b0 with other parameter names: a bare --arch
    builds the one whose layout fits the file, a prefixed one is taken as given."""
    pytest.importorskip("timm")
    from common.inference import load_for_inference

    model, _ = build_model(f"{source}/efficientnet_b0", 2)
    file = tmp_path / "weights.pth"
    torch.save(model.state_dict(), file)
    loaded = load_for_inference(file, torch.device("cpu"), arch="efficientnet_b0", num_classes=2)
    assert loaded.spec["source"] == source
    assert any(f"--arch {source}/efficientnet_b0" in n for n in loaded.notes)
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))
    other = "timm" if source == "torchvision" else "torchvision"
    with pytest.raises(UserError, match="do not fit"):
        load_for_inference(file, torch.device("cpu"), arch=f"{other}/efficientnet_b0", num_classes=2)
