"""common/models: the registry (own -> torchvision -> timm), specs, heads and --weights."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from common import checkpoint as ck
from common.errors import UserError
from common.models import build_model, find_source, load_weights_file, model_from_spec, replace_head
from common.models.small import SmallCNN, TinyMLP


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("cls", [SmallCNN, TinyMLP])
def test_small_models_forward(cls):
    model = cls(num_classes=4).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    gray = cls(num_classes=2, in_chans=1).eval()
    assert gray(torch.randn(3, 1, 20, 20)).shape == (3, 2)


def test_build_local_model_and_spec():
    model, spec = build_model("small_cnn", 3)
    assert isinstance(model, SmallCNN)
    assert spec == {"name": "small_cnn", "source": "local", "kwargs": {"num_classes": 3}}
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    _, spec1 = build_model("small_cnn", 3, in_chans=1)
    assert spec1["kwargs"] == {"num_classes": 3, "in_chans": 1}


def test_build_torchvision_model():
    model, spec = build_model("torchvision/resnet18", 3)
    assert spec == {"name": "resnet18", "source": "torchvision", "kwargs": {"num_classes": 3}}
    assert model.fc.out_features == 3
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_torchvision_refuses_other_channel_counts():
    with pytest.raises(UserError, match="timm"):
        build_model("torchvision/resnet18", 3, in_chans=1)


def test_build_timm_model():
    pytest.importorskip("timm")
    model, spec = build_model("resnet10t", 3, in_chans=1)
    assert spec == {"name": "resnet10t", "source": "timm", "kwargs": {"num_classes": 3, "in_chans": 1}}
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 3)


def test_find_source_order():
    assert find_source("small_cnn") == "local"
    assert find_source("vit_b_16") == "torchvision"  # only torchvision has it
    assert find_source("torchvision/resnet18") == "torchvision"
    pytest.importorskip("timm")
    assert find_source("resnet18") == "timm"  # timm wins over torchvision's (guide 000 is a timm guide)
    assert find_source("resnet10t") == "timm"


def test_unknown_model_suggests_close_names():
    with pytest.raises(UserError) as info:
        build_model("resnet19", 2)
    message = str(info.value)
    assert "'resnet19'" in message
    assert "Did you mean" in message and "resnet18" in message
    assert "--list-models" in message


def test_unknown_model_without_close_match():
    with pytest.raises(UserError) as info:
        build_model("qqqqqqqqqqqqqqqqqqqqqqqqq", 2)
    assert "Did you mean" not in str(info.value)


def test_local_model_has_no_pretrained_weights():
    with pytest.raises(UserError, match="--pretrained"):
        build_model("small_cnn", 2, pretrained=True)


def test_bad_spec_source_and_name():
    with pytest.raises(UserError, match="source"):
        model_from_spec({"name": "small_cnn", "source": "keras", "kwargs": {"num_classes": 2}})
    with pytest.raises(UserError, match="'big_cnn'"):
        model_from_spec({"name": "big_cnn", "source": "local", "kwargs": {"num_classes": 2}})


@pytest.mark.parametrize("name, kwargs", [
    ("small_cnn", {"in_chans": 1}),
    ("tiny_mlp", {}),
    ("torchvision/resnet18", {}),
    ("resnet10t", {"in_chans": 2}),
])
def test_model_from_spec_rebuilds_the_same_architecture(name, kwargs):
    if name == "resnet10t":
        pytest.importorskip("timm")
    model, spec = build_model(name, 5, **kwargs)
    rebuilt = model_from_spec(spec)
    assert type(rebuilt) is type(model)
    assert shapes(rebuilt) == shapes(model)
    # and the weights of one load strictly into the other
    ck.load_state_dict_checked(rebuilt, model.state_dict(), "spec test")
    if name in ("small_cnn", "tiny_mlp"):  # cheap enough to compare outputs too
        x = torch.randn(1, kwargs.get("in_chans", 3), 32, 32)
        with torch.no_grad():
            assert torch.allclose(rebuilt.eval()(x), model.eval()(x))


def test_replace_head():
    model = SmallCNN(num_classes=10)
    body = model.features[0][0].weight.clone()
    replace_head(model, 4)
    assert model.head[2].out_features == 4 and model.head[2].in_features == 128
    assert torch.equal(model.features[0][0].weight, body)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 4)

    resnet, _ = build_model("torchvision/resnet18", 1000)  # torchvision: the head is .fc
    fc = resnet.fc
    replace_head(resnet, 1000)  # same size: the trained head is kept
    assert resnet.fc is fc
    replace_head(resnet, 7)
    assert resnet.fc.out_features == 7


def test_replace_head_without_linear_layer():
    with pytest.raises(UserError, match="classifier"):
        replace_head(nn.Sequential(nn.Conv2d(3, 2, 1)), 3)


def save(obj, path):
    torch.save(obj, path)
    return path


def test_load_weights_keeps_a_different_head(tmp_path):
    torch.manual_seed(0)
    source = SmallCNN(num_classes=5)
    path = save(source.state_dict(), tmp_path / "five.pth")
    torch.manual_seed(1)
    target = SmallCNN(num_classes=3)
    head_before = target.head[2].weight.clone()
    logged: list[str] = []
    load_weights_file(target, path, logged.append)
    assert torch.equal(target.features[0][0].weight, source.features[0][0].weight)
    assert torch.equal(target.features[0][1].running_mean, source.features[0][1].running_mean)
    assert torch.equal(target.head[2].weight, head_before)
    total = len(target.state_dict())
    assert len(logged) == 1
    assert f"loaded {total - 2}/{total} tensors" in logged[0]
    assert "head.2.bias" in logged[0] and "head.2.weight" in logged[0]
    assert str(path) in logged[0]


@pytest.mark.parametrize("wrap", ["module", "orig_mod", "state_dict", "model_state_dict", "toolkit"])
def test_load_weights_unwraps_common_layouts(tmp_path, wrap):
    torch.manual_seed(0)
    source = SmallCNN(num_classes=3)
    state = source.state_dict()
    if wrap == "module":
        obj = {f"module.{k}": v for k, v in state.items()}
    elif wrap == "orig_mod":
        obj = {f"_orig_mod.{k}": v for k, v in state.items()}
    elif wrap == "toolkit":
        obj = ck.make_payload(source, task="classification",
                              model_spec={"name": "small_cnn", "source": "local", "kwargs": {}},
                              meta={}, metrics={}, config={})
    else:
        obj = {wrap: dict(state), "epoch": 3}
    path = save(obj, tmp_path / "w.pth")
    torch.manual_seed(1)
    target = SmallCNN(num_classes=3)
    logged: list[str] = []
    load_weights_file(target, path, logged.append)
    for key, value in state.items():
        assert torch.equal(target.state_dict()[key], value), key
    total = len(state)
    assert f"loaded {total}/{total}" in logged[0] and "kept new" not in logged[0]


def test_load_weights_nothing_fits(tmp_path):
    path = save(TinyMLP(num_classes=3).state_dict(), tmp_path / "mlp.pth")
    target = SmallCNN(num_classes=3)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(UserError) as info:
        load_weights_file(target, path, lambda _: None)
    assert str(path) in str(info.value) and "SmallCNN" in str(info.value)
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key])


def test_load_weights_not_a_state_dict(tmp_path):
    path = save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(UserError, match="no state_dict"):
        load_weights_file(SmallCNN(num_classes=3), path, lambda _: None)


def test_load_weights_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_weights_file(SmallCNN(num_classes=3), tmp_path / "none.pth", lambda _: None)
