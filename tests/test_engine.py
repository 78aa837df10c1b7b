"""The one training loop: accumulation semantics, the GradScaler path (no host sync per step:
tests/test_host_sync.py)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from common.engine import StepConfig, TrainState, evaluate, fit, train_one_epoch
from common.models.small import TinyMLP
from common.optim import Schedule
from common.precision import Precision, make_precision
from common.tasks import ClassificationTask

CPU = torch.device("cpu")


def batches(n: int, size: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, 3, (size,), generator=g))
            for _ in range(n)]


def run_engine(model: nn.Module, data, accumulate: int, precision: Precision | None = None,
               clip: float | None = None, splits: int = 1) -> TrainState:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = -(-len(data) // accumulate)
    schedule = Schedule(opt, "none", epochs=1, steps_per_epoch=steps)
    state = TrainState()
    train_one_epoch(model, ClassificationTask(3), data, opt, schedule,
                    precision or make_precision(CPU, amp=False), CPU,
                    StepConfig(accumulate=accumulate, clip_grad=clip, show_progress=False, splits=splits),
                    state)
    return state


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("n, last", [(7, 4), (6, 1)])
@pytest.mark.parametrize("accumulate", [1, 2, 3])
def test_accumulation_equals_one_big_batch_including_short_last_group(accumulate, n, last, splits):
    """Each group steps as one big batch. n=7 micro-batches of 4: with 3 -> groups of 3, 3 and a
    short 1. n=6 whose last holds 1 sample (drop_last=False): groups of 4 + 1 (accumulate 2) or
    4 + 4 + 1 samples (accumulate 3), whose step must be that of one batch of those samples, each
    weighing the same (also when out-of-memory recovery has split every batch into chunks)."""
    torch.manual_seed(0)
    model = TinyMLP(3, pool=4, hidden=16)
    reference = copy.deepcopy(model)
    data = batches(n - 1) + batches(1, size=last, seed=9)
    state = run_engine(model, data, accumulate, splits=splits)
    assert state.step == -(-n // accumulate)

    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for start in range(0, n, accumulate):
        group = data[start:start + accumulate]
        x = torch.cat([b[0] for b in group])
        y = torch.cat([b[1] for b in group])
        opt.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        opt.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# No host sync per step: tests/test_host_sync.py.


def test_grad_scaler_path_with_clipping_matches_plain_training():
    """The GradScaler branch (scale, unscale_, clip, step, update) runs on CPU and gives the same
    update as no scaler: the scale cancels out exactly for a power-of-two scale."""
    torch.manual_seed(1)
    model = TinyMLP(3, pool=4, hidden=16)
    scaled_model = copy.deepcopy(model)
    data = batches(4)
    run_engine(model, data, 2, clip=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    scaled = Precision(device_type="cpu", dtype=None, scaler=scaler)
    run_engine(scaled_model, data, 2, precision=scaled, clip=0.5)
    assert scaler.get_scale() == 1024.0  # no overflow, scale unchanged
    for a, b in zip(model.parameters(), scaled_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bfloat16_autocast_trains_on_cpu():
    torch.manual_seed(2)
    model = TinyMLP(3, pool=4, hidden=16)
    before = [p.detach().clone() for p in model.parameters()]
    precision = make_precision(CPU, amp=True, amp_dtype="bfloat16", log=lambda _: None)
    assert precision.dtype is torch.bfloat16 and not precision.scaler.is_enabled()
    seen = []  # (layer, output dtype, grad enabled) of every forward of the two Linear layers
    for index in (2, 4):
        model.net[index].register_forward_hook(
            lambda mod, args, out, index=index: seen.append((index, out.dtype, torch.is_grad_enabled())))
    run_engine(model, batches(3), 1, precision=precision)
    # each of the 3 training steps ran both layers under bfloat16 autocast, with autograd on
    assert seen == [(i, torch.bfloat16, True) for _ in range(3) for i in (2, 4)]
    assert all(p.dtype is torch.float32 for p in model.parameters())  # the weights stay float32
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_fit_tracks_best_and_stops_early():
    torch.manual_seed(3)
    model = TinyMLP(3, pool=4, hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the metric never improves
    schedule = Schedule(opt, "none", epochs=10, steps_per_epoch=2)
    calls = []
    state = fit(model, ClassificationTask(3), batches(2), batches(2, seed=5), opt, schedule,
                make_precision(CPU, amp=False), CPU, epochs=10, state=TrainState(),
                step_cfg=StepConfig(show_progress=False), patience=3,
                on_epoch_end=lambda s, r, improved: calls.append(improved), log=lambda _: None)
    assert calls == [True, False, False, False]
    assert state.epoch == 4 and state.best_epoch == 1
    assert [r["epoch"] for r in state.history] == [1, 2, 3, 4]


def test_evaluate_counts_every_sample_and_builds_confusion():
    model = TinyMLP(3, pool=4, hidden=16)
    data = batches(3, size=5)
    totals = evaluate(model, ClassificationTask(3), data, make_precision(CPU, amp=False), CPU)
    assert int(totals["count"]) == 15
    assert int(totals["confusion"].sum()) == 15
    with torch.no_grad():
        preds = torch.cat([model(x).argmax(1) for x, _ in data])
    targets = torch.cat([y for _, y in data])
    assert int(totals["correct"]) == int((preds == targets).sum())
    assert int(totals["confusion"].diag().sum()) == int(totals["correct"])


def test_restore_best_puts_the_best_epochs_weights_back():
    torch.manual_seed(4)
    model = TinyMLP(3, pool=4, hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=5.0)  # a wild lr: later epochs get worse
    schedule = Schedule(opt, "none", epochs=6, steps_per_epoch=2)
    best: dict[str, torch.Tensor] = {}

    def remember(state, record, improved):
        if improved:
            best.update({k: v.clone() for k, v in model.state_dict().items()})

    state = fit(model, ClassificationTask(3), batches(2), batches(2, seed=5), opt, schedule,
                make_precision(CPU, amp=False), CPU, epochs=6, state=TrainState(),
                step_cfg=StepConfig(show_progress=False), on_epoch_end=remember,
                log=lambda _: None, restore_best=True)
    assert state.best_epoch < state.epoch  # the last epoch was not the best one
    for key, value in model.state_dict().items():
        assert torch.equal(value, best[key]), key


class FakeBar:
    """Stands in for tqdm: records the description and every postfix the engine sets."""
    made: list[FakeBar] = []

    def __init__(self, iterable=None, desc: str = "", **kwargs):
        self.iterable, self.desc, self.postfixes = iterable, desc, []
        if iterable is None:  # the training bar (evaluate() wraps its loader, without a bar here)
            FakeBar.made.append(self)

    def __iter__(self):
        return iter(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, values, refresh: bool = True) -> None:
        self.postfixes.append(dict(values))


def test_the_bar_shows_the_metrics_of_an_epoch_shorter_than_the_log_interval(monkeypatch):
    import common.engine as engine

    monkeypatch.setattr(engine, "tqdm", FakeBar)
    FakeBar.made = []
    model = TinyMLP(3, pool=4, hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = Schedule(opt, "none", epochs=2, steps_per_epoch=3)
    state = fit(model, ClassificationTask(3), batches(3), batches(2, seed=5), opt, schedule,
                make_precision(CPU, amp=False), CPU, epochs=2, state=TrainState(),
                step_cfg=StepConfig(log_interval=20, show_progress=True), log=lambda _: None)
    first, second = FakeBar.made
    assert len(first.postfixes) == 1  # 3 batches, log interval 20: shown once, at the end
    shown = first.postfixes[0]
    record = state.history[0]
    assert shown["loss"] == f"{record['train_loss']:.4f}"
    assert shown["acc"] == f"{100 * record['train_acc']:.2f}%"  # in % like the epoch line
    assert shown["lr"] == "1.00e-01" and "img/s" in shown
    # the second epoch's bar names the first epoch's validation result (which picks the best)
    assert first.desc == "epoch 1/2"
    assert second.desc == f"epoch 2/2 (last val acc {100 * record['val_acc']:.2f}%)"


def test_the_bar_keeps_its_interval_postfixes_and_ends_with_the_epoch(monkeypatch):
    import common.engine as engine

    monkeypatch.setattr(engine, "tqdm", FakeBar)
    FakeBar.made = []
    model = TinyMLP(3, pool=4, hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    metrics = train_one_epoch(model, ClassificationTask(3), batches(5), opt,
                              Schedule(opt, "none", epochs=1, steps_per_epoch=5),
                              make_precision(CPU, amp=False), CPU,
                              StepConfig(log_interval=2, show_progress=True), TrainState())
    (bar,) = FakeBar.made
    assert len(bar.postfixes) == 3  # after batches 2 and 4, then the epoch's own numbers
    assert bar.postfixes[-1]["loss"] == f"{metrics['loss']:.4f}"


@pytest.mark.parametrize("splits", [1, 2])
def test_the_samplers_padding_trains_but_is_counted_once(splits):
    """Rank 1 of 2 on 7 samples is dealt 4 indices, the last a repeat of the order's first (so both
    ranks take as many steps). The reduced totals must count 3: the epoch's loss is the mean over
    the 3 real samples, not over 4 with one of them twice (lr 0 keeps the weights fixed)."""
    from common.distributed import ShardSampler

    g = torch.Generator().manual_seed(3)
    data = torch.utils.data.TensorDataset(torch.randn(7, 3, 8, 8, generator=g), torch.arange(7) % 3)
    sampler = ShardSampler(data, rank=1, world_size=2, seed=4)
    assert (len(sampler), sampler.padding) == (4, 1)
    assert ShardSampler(data, rank=0, world_size=2, seed=4).padding == 0
    indices = list(sampler)
    loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler)
    torch.manual_seed(0)
    model = TinyMLP(3, pool=4, hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    metrics = train_one_epoch(model, ClassificationTask(3), loader, opt,
                              Schedule(opt, "none", epochs=1, steps_per_epoch=1),
                              make_precision(CPU, amp=False), CPU,
                              StepConfig(show_progress=False, splits=splits), TrainState())
    with torch.no_grad():
        x, y = data[indices[:3]]
        expected = nn.functional.cross_entropy(model(x), y).item()
        x4, y4 = data[indices]
        with_repeat = nn.functional.cross_entropy(model(x4), y4).item()
    assert abs(with_repeat - expected) > 1e-4  # the repeat would show
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
