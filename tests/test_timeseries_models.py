"""common/models/timeseries.py: shapes for any window, sizes, learning, determinism, state_dict
round trips, the positional encoding and skip paths, gradient checkpointing, and ONNX export."""
from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.memory import grad_checkpointing_on, supports_grad_checkpointing
from common.models import head_name, replace_head
from common.models.timeseries import SeriesCNN, SeriesFusion, SeriesTransformer, sinusoidal_positions

MODELS = [SeriesCNN, SeriesTransformer, SeriesFusion]
ids = [m.__name__ for m in MODELS]


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sines(per_class: int, seed: int, length: int = 64, chans: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """3 classes of noisy sines, 2 / 4 / 7 cycles per window (+-0.3), random phase and amplitude
    per channel, Gaussian noise of std 0.4."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(3).repeat_interleave(per_class)
    n = len(y)
    cycles = torch.tensor([2.0, 4.0, 7.0])[y] + (torch.rand(n, generator=g) - 0.5) * 0.6
    phase = torch.rand(n, chans, 1, generator=g) * 2 * math.pi
    amp = 0.5 + torch.rand(n, chans, 1, generator=g)
    t = torch.arange(length) / length
    x = amp * torch.sin(2 * math.pi * cycles.view(n, 1, 1) * t + phase)
    return x + 0.4 * torch.randn(n, chans, length, generator=g), y


@pytest.mark.parametrize("cls", MODELS, ids=ids)
def test_logits_for_any_window_length_and_channel_count(cls):
    torch.manual_seed(0)
    for chans in (3, 6, 12):
        model = cls(num_classes=5, in_chans=chans, width=16).eval()
        for length in (8, 9, 63, 128, 300):  # 9, 63, 300: not multiples of the patch (4)
            with torch.no_grad():
                out = model(torch.randn(2, chans, length))
            assert out.shape == (2, 5), (chans, length)
            assert out.dtype == torch.float32 and torch.isfinite(out).all()
    model.train()
    assert model(torch.randn(3, 12, 8)).shape == (3, 5)


@pytest.mark.parametrize("cls", MODELS, ids=ids)
def test_bfloat16_autocast_trains(cls):
    """--amp --amp-dtype bfloat16 on a CPU: the positions follow the tokens' dtype."""
    torch.manual_seed(0)
    model = cls(num_classes=3, in_chans=6, width=16).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 6, 50))
    assert out.shape == (4, 3) and torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("cls", MODELS, ids=ids)
def test_default_size_is_under_a_million_parameters_and_scales_with_width_and_depth(cls):
    default = count(cls(num_classes=3, in_chans=6))
    assert 10_000 < default < 1_000_000
    assert count(cls(num_classes=3, in_chans=6, width=32)) < default < count(cls(num_classes=3, in_chans=6,
                                                                                 width=128))
    assert count(cls(num_classes=3, in_chans=6, depth=1)) < default < count(cls(num_classes=3, in_chans=6,
                                                                                depth=3))
    assert count(cls(num_classes=3, in_chans=12)) > count(cls(num_classes=3, in_chans=6))


@pytest.mark.parametrize(("cls", "epochs"), [(SeriesCNN, 6), (SeriesTransformer, 12), (SeriesFusion, 6)],
                         ids=ids)
def test_model_learns_sine_frequencies_on_held_out_windows(cls, epochs):
    x_train, y_train = sines(60, seed=0)
    x_test, y_test = sines(30, seed=1)
    torch.manual_seed(0)
    model = cls(num_classes=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(0)
    with torch.no_grad():
        before = (model.eval()(x_test).argmax(1) == y_test).float().mean().item()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y_train), generator=order).split(20):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        accuracy = (model.eval()(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy >= 0.9, f"held-out accuracy {accuracy:.3f} (before training {before:.3f})"


@pytest.mark.parametrize("cls", MODELS, ids=ids)
def test_eval_is_deterministic_and_each_window_independent_of_its_batch(cls):
    torch.manual_seed(0)
    model = cls(num_classes=3, in_chans=6, dropout=0.5)
    x = torch.randn(4, 6, 100)
    model.train()
    assert not torch.equal(model(x), model(x))  # dropout (and batch statistics) are on in training
    model.eval()
    with torch.no_grad():
        first, second = model(x), model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
    assert torch.equal(first, second)
    torch.testing.assert_close(alone, first, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", MODELS, ids=ids)
def test_state_dict_round_trips_into_a_fresh_instance_built_from_the_same_kwargs(cls):
    kwargs = json.loads(json.dumps({"num_classes": 4, "in_chans": 5, "width": 32, "depth": 3,
                                    "dropout": 0.2}))  # a plain spec dict, as in a checkpoint
    torch.manual_seed(0)
    model = cls(**kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # move the weights and the batch-norm running statistics off their init
        F.cross_entropy(model(torch.randn(8, 5, 40)), torch.randint(0, 4, (8,))).backward()
        opt.step()
    torch.manual_seed(1)
    fresh = cls(**kwargs)
    x = torch.randn(3, 5, 40)
    with torch.no_grad():
        assert not torch.allclose(fresh.eval()(x), model.eval()(x))
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(fresh(x), model(x))
    assert type(model).__mro__[1] is nn.Module


@pytest.mark.parametrize("cls", MODELS, ids=ids)
def test_features_head_and_registry_helpers(cls):
    torch.manual_seed(0)
    model = cls(num_classes=3, in_chans=6).eval()
    x = torch.randn(2, 6, 128)
    with torch.no_grad():
        feats = model.features(x)
        assert feats.shape == (2, model.feature_dim)
        headless = cls(num_classes=0, in_chans=6).eval()
        assert headless(x).shape == (2, headless.feature_dim) == (2, model.feature_dim)
        assert isinstance(headless.head, nn.Identity)  # num_classes=0: no classifier (timm's convention)
        assert head_name(model).startswith("head")
        replace_head(model, 7)  # what fine-tuning on other classes does
        assert model(x).shape == (2, 7)
        torch.testing.assert_close(model.features(x), feats)


def test_fusion_has_no_parameters_outside_the_graph():
    """DistributedDataParallel refuses parameters that get no gradient (the branches' heads)."""
    model = SeriesFusion(num_classes=3)
    model(torch.randn(4, 3, 64)).sum().backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert unused == []
    assert model.feature_dim == model.cnn.feature_dim + model.transformer.feature_dim


@pytest.mark.parametrize("cls", MODELS, ids=ids)
def test_wrong_input_is_a_clear_pytorch_error(cls):
    model = cls(num_classes=3, in_chans=6).eval()
    with pytest.raises(RuntimeError, match="channels"):
        model(torch.randn(2, 3, 64))
    with pytest.raises(ValueError, match=r"\(N, C=6, T\)"):
        model(torch.randn(6, 64))


def test_bad_constructor_arguments_are_value_errors():
    with pytest.raises(ValueError, match="heads dividing width"):
        SeriesTransformer(num_classes=3, width=30, heads=4)
    with pytest.raises(ValueError, match="odd kernel_size"):
        SeriesCNN(num_classes=3, kernel_size=4)
    with pytest.raises(ValueError, match="depth"):
        SeriesFusion(num_classes=3, depth=0)


def test_sinusoidal_positions_for_any_length_and_width():
    pe = sinusoidal_positions(300, 64)
    assert pe.shape == (300, 64)
    torch.testing.assert_close(pe[0], torch.tensor([0.0, 1.0] * 32))
    torch.testing.assert_close(pe[7, :2], torch.tensor([math.sin(7.0), math.cos(7.0)]))
    assert torch.cdist(pe, pe).add(torch.eye(300)).min() > 0.1  # every position distinct
    torch.testing.assert_close(sinusoidal_positions(100, 64), pe[:100])  # a prefix: length-free
    assert sinusoidal_positions(5, 7).shape == (5, 7)


def test_transformer_tokens_carry_their_positions():
    """Without positions the encoder and mean pooling could not see the order of the patches:
    the tokens of a constant window must differ exactly by the sinusoidal encoding."""
    model = SeriesTransformer(num_classes=3, in_chans=3, width=32).eval()
    with torch.no_grad():
        tokens = model.tokens(torch.zeros(1, 3, 70))  # 70 -> padded to 72: 18 tokens
    assert tokens.shape == (1, 18, 32)
    pe = sinusoidal_positions(18, 32)
    torch.testing.assert_close(tokens[0] - tokens[0, :1], pe - pe[:1])


def test_cnn_skip_connections_carry_the_input_past_each_block():
    """With every block's residual branch switched off (last batch norm scale and shift zero)
    the output still depends on the input, through the skips."""
    torch.manual_seed(0)
    model = SeriesCNN(num_classes=3, width=16, depth=3).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.body[-1].weight.zero_()
            block.body[-1].bias.zero_()
        a, b = model.features(torch.randn(2, 3, 64)), model.features(torch.randn(2, 3, 64))
    assert (a - b).abs().max() > 1e-3


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward after one forward pass."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(storages.values())


@pytest.mark.parametrize("cls", MODELS, ids=ids)
def test_grad_checkpointing_gives_the_same_step_with_less_kept_for_backward(cls):
    torch.manual_seed(0)
    plain = cls(num_classes=3, width=32, depth=3, dropout=0.1).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    assert supports_grad_checkpointing(ckpt) and grad_checkpointing_on(ckpt)
    assert not grad_checkpointing_on(plain)
    x, y = torch.randn(8, 3, 128), torch.randint(0, 3, (8,))
    for model in (plain, ckpt):
        torch.manual_seed(1)  # the same dropout masks; the recomputation must replay them
        F.cross_entropy(model(x), y).backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers(), strict=True):
        assert torch.equal(a, b), name  # batch-norm statistics updated once per step
    assert _saved_bytes(ckpt, x) < 0.7 * _saved_bytes(plain, x)


# The torch.export-based exporter (export_onnx.py's default) takes ~5 s a model; SeriesFusion holds
# both other models, so it alone covers their operators and batch axis there.
EXPORTS = [(cls, "torchscript") for cls in MODELS] + [(SeriesFusion, "dynamo")]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(("cls", "exporter"), EXPORTS, ids=[f"{c.__name__}-{e}" for c, e in EXPORTS])
def test_onnx_export_matches_onnxruntime_at_batch_1_and_4(cls, exporter, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = cls(num_classes=3, in_chans=6).eval()
    x = torch.randn(4, 6, 100)  # 100: padded inside the transformer
    path = tmp_path / "model.onnx"
    names = {"input_names": ["input"], "output_names": ["logits"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":  # export_onnx.py's default (opset 18), with a batch-2 example as there
            program = torch.onnx.export(model, (x[:2],), None, dynamo=True, opset_version=18,
                                        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                                        verbose=False, **names)
            program.save(str(path))
        else:
            torch.onnx.export(model, (x[:2],), str(path), dynamo=False, opset_version=17,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **names)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x).numpy()
    for batch in (1, 4):
        (got,) = session.run(None, {"input": x[:batch].numpy()})
        assert got.shape == (batch, 3)
        assert abs(got - expected[:batch]).max() < 1e-4, batch
