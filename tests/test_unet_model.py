"""common/models/unet.py: shapes, the bilinear variant, and gradient checkpointing."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from common.errors import UserError
from common.models.unet import UNet


def _pair(bilinear: bool = False, seed: int = 0) -> tuple[UNet, UNet]:
    """Two U-Nets with the same weights, the second with checkpointing on."""
    torch.manual_seed(seed)
    plain = UNet(num_classes=3, bilinear=bilinear, base=4).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    return plain, ckpt


def _train_step(model: UNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    return logits.detach()


def _saved_bytes(model: UNet, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward after one forward pass."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(storages.values())


@pytest.mark.parametrize("bilinear", [False, True])
@pytest.mark.parametrize("size", [(16, 16), (37, 45), (64, 48), (33, 17)])
def test_output_has_input_size_and_one_channel_per_class(bilinear, size):
    for in_chans, num_classes in [(1, 1), (3, 3), (4, 2)]:
        model = UNet(num_classes=num_classes, in_chans=in_chans, bilinear=bilinear, base=4).eval()
        with torch.no_grad():
            out = model(torch.rand(2, in_chans, *size))
        assert out.shape == (2, num_classes, *size)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()


def test_bilinear_halves_the_deepest_block_and_has_fewer_parameters():
    def count(m):
        return sum(p.numel() for p in m.parameters())

    transposed, bilinear = UNet(2, base=8, bilinear=False), UNet(2, base=8, bilinear=True)
    assert transposed.down4.maxpool_conv[1].double_conv[3].out_channels == 16 * 8
    assert bilinear.down4.maxpool_conv[1].double_conv[3].out_channels == 8 * 8
    assert isinstance(transposed.up1.up, torch.nn.ConvTranspose2d)
    assert isinstance(bilinear.up1.up, torch.nn.Upsample)
    assert count(bilinear) < count(transposed)


def test_attributes_and_pytorch_unet_parameter_names():
    model = UNet(num_classes=2, in_chans=1, bilinear=False, base=4)
    assert (model.num_classes, model.n_classes, model.in_chans, model.n_channels) == (2, 2, 1, 1)
    keys = set(model.state_dict())
    for key in ["inc.double_conv.0.weight", "inc.double_conv.1.running_mean",
                "down4.maxpool_conv.1.double_conv.3.weight", "up1.up.weight", "up4.conv.double_conv.4.bias",
                "outc.conv.weight", "outc.conv.bias"]:
        assert key in keys
    assert "inc.double_conv.0.bias" not in keys  # conv before batch norm: no bias


def test_too_small_input_is_a_clear_error():
    model = UNet(2, base=4).eval()
    with pytest.raises(UserError, match=r"at least 16x16.*\(12, 40\)"):
        model(torch.rand(1, 3, 12, 40))


def test_grad_checkpointing_switch():
    model = UNet(2, base=4)
    assert model.grad_checkpointing is False
    model.set_grad_checkpointing()
    assert model.grad_checkpointing is True
    model.set_grad_checkpointing(False)
    assert model.grad_checkpointing is False


@pytest.mark.parametrize("bilinear", [False, True])
def test_checkpointing_gives_the_same_outputs_and_gradients(bilinear):
    plain, ckpt = _pair(bilinear)
    x = torch.rand(2, 3, 37, 45)
    y = torch.randint(0, 3, (2, 37, 45))
    out_plain, out_ckpt = _train_step(plain, x, y), _train_step(ckpt, x, y)
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=1e-5)
    grads = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=0, atol=1e-5, msg=name)


def test_checkpointing_updates_batch_norm_statistics_once():
    """The backward pass recomputes each block; its batch norms must not count the batch again."""
    plain, ckpt = _pair()
    x = torch.rand(2, 3, 32, 32)
    y = torch.randint(0, 3, (2, 32, 32))
    for _ in range(2):
        _train_step(plain, x, y)
        _train_step(ckpt, x, y)
    state = plain.state_dict()
    for key, value in ckpt.state_dict().items():
        if "running" in key or "num_batches_tracked" in key:
            torch.testing.assert_close(value, state[key], rtol=0, atol=1e-6, msg=key)
    assert int(ckpt.state_dict()["up4.conv.double_conv.1.num_batches_tracked"]) == 2


def test_checkpointing_keeps_fewer_activations_for_backward():
    plain, ckpt = _pair()
    x = torch.rand(2, 3, 64, 64)
    without, with_ckpt = _saved_bytes(plain, x), _saved_bytes(ckpt, x)
    assert with_ckpt < 0.6 * without, (with_ckpt, without)


def test_checkpointing_peak_of_a_training_step_is_at_most_half_and_a_bit():
    """The peak of one training step (parameters, gradients, activations, workspace) as torch's
    MemTracker counts it on the CPU, at the bench's proportions (bench/grad_checkpointing.py on
    CUDA: width 32, batch 4, 256 px, target <= 0.6): checkpointing whole blocks keeps only their
    inputs; checkpointing only the double convs (storing each pooled map, upsampled map and
    concatenation) gave 0.63 here."""
    tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    from common.tasks import SegmentationTask

    def peak(checkpointing: bool) -> int:
        torch.manual_seed(0)
        model = UNet(2, base=16).train()
        model.set_grad_checkpointing(checkpointing)
        x, y = torch.rand(2, 3, 256, 256), torch.randint(0, 2, (2, 256, 256))
        mt = tracker.MemTracker()
        mt.track_external(model)
        with mt:
            SegmentationTask(2).loss(model(x), y).backward()
        return sum(d["Total"] for d in mt.get_tracker_snapshot("peak").values())

    without, with_ckpt = peak(False), peak(True)
    assert with_ckpt <= 0.55 * without, (with_ckpt, without)


def test_checkpointing_is_off_in_eval_mode_and_without_grad():
    plain, ckpt = _pair()
    x = torch.rand(1, 3, 32, 32)
    plain.eval()
    ckpt.eval()
    assert _saved_bytes(ckpt, x) == _saved_bytes(plain, x)
    with torch.no_grad():
        torch.testing.assert_close(ckpt(x), plain(x), rtol=0, atol=0)


def test_state_dict_keys_do_not_change_with_checkpointing():
    model = UNet(2, base=4, bilinear=True)
    before = {k: v.shape for k, v in model.state_dict().items()}
    model.set_grad_checkpointing(True)
    assert {k: v.shape for k, v in model.state_dict().items()} == before
    fresh = UNet(2, base=4, bilinear=True)
    fresh.load_state_dict(model.state_dict())  # strict: same keys either way
    model.set_grad_checkpointing(False)
    assert list(model.state_dict()) == list(before)


def test_batch_one_trains_at_a_one_pixel_bottleneck():
    """The guide's -b 1 -s 0.25 on 64 px images: 16x16 inputs reach the bottleneck as 1x1 maps, one
    value per channel, where nn.BatchNorm2d raises "Expected more than 1 value per channel". The
    U-Net's batch norm normalises such a batch with its running statistics and leaves them alone."""
    torch.manual_seed(0)
    model = UNet(num_classes=2, bilinear=True, base=4).train()
    bottleneck = model.down4.maxpool_conv[1].double_conv[1]
    first = model.inc.double_conv[1]
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        torch.nn.BatchNorm2d(bottleneck.num_features).train()(torch.rand(1, bottleneck.num_features, 1, 1))
    x, y = torch.rand(1, 3, 16, 16), torch.randint(0, 2, (1, 16, 16))
    logits = _train_step(model, x, y)
    assert logits.shape == (1, 2, 16, 16) and torch.isfinite(logits).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert torch.equal(bottleneck.running_mean, torch.zeros_like(bottleneck.running_mean))
    assert not torch.equal(first.running_mean, torch.zeros_like(first.running_mean))  # 256 values there
    _train_step(model, torch.rand(1, 3, 32, 16), torch.randint(0, 2, (1, 32, 16)))  # 2x1 bottleneck
    assert not torch.equal(bottleneck.running_mean, torch.zeros_like(bottleneck.running_mean))
