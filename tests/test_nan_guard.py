"""The NaN/Inf guard (common/nanguard.py): a non-finite loss or gradient stops the run with the epoch,
the step and the batch's samples, the last good checkpoint intact; --nan-policy skip skips exactly
that step's update; a non-finite validation loss never makes a best model."""
from __future__ import annotations

import collections
import copy
import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, make_folder
from torch import nn

import gpu_train
import train_unet
from common.checkpoint import load_checkpoint
from common.data import images as images_mod
from common.data import segmentation as segmentation_mod
from common.data.loaders import make_loader
from common.data.segmentation import make_shapes_dataset
from common.engine import StepConfig, TrainState, fit, train_one_epoch
from common.memory import OOMRecovery
from common.models.small import TinyMLP
from common.nanguard import NonFiniteGuard, NonFiniteStop, sample_indices
from common.optim import Schedule
from common.precision import Precision, make_precision
from common.tasks import ClassificationTask

CPU = torch.device("cpu")


class Net(nn.Module):
    """Conv + batch norm: a skipped step must also leave the running statistics alone."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        return self.body(x)


def data(n: int, size: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, 3, (size,), generator=g))
            for _ in range(n)]


def poisoned(batch):
    return torch.full_like(batch[0], math.nan), batch[1]


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3,
                           fused=True)


def train(model, batches, name="adamw", accumulate=1, guard=None, clip=None, recovery=None,
          log_interval=100):
    opt = make_optimizer(name, model)
    schedule = Schedule(opt, "none", epochs=1, steps_per_epoch=-(-len(batches) // accumulate))
    cfg = StepConfig(accumulate=accumulate, clip_grad=clip, show_progress=False, recovery=recovery,
                     log_interval=log_interval, guard=guard)
    metrics = train_one_epoch(model, ClassificationTask(3), batches, opt, schedule,
                              make_precision(CPU, amp=False), CPU, cfg, TrainState())
    return opt, metrics


def dirty_allocator(model: nn.Module) -> None:
    """Leave freed memory of each parameter's size full of 1e30: torch's fused SGD takes its first
    momentum buffers from torch.empty_like, which then returns that garbage."""
    for p in model.parameters():
        junk = torch.full_like(p, 1e30)
        del junk


# ---------------------------------------------------------------------------- the engine


@pytest.mark.parametrize("name, accumulate, bad", [("adamw", 1, 2), ("adamw", 2, 3), ("sgd", 1, 0),
                                                   ("sgd", 2, 2)])
def test_skip_equals_a_run_without_that_step(name, accumulate, bad):
    """Weights, batch-norm statistics, optimizer state (Adam's moments and step count, SGD's momentum)
    and the epoch's metrics are those of a run that never saw the skipped step's batches; also
    when the skipped step is the first (fused SGD's own first-step buffers would be garbage)."""
    batches = data(6)
    with_nan = [poisoned(b) if i == bad else b for i, b in enumerate(batches)]
    model, reference = Net(), Net()
    messages: list[str] = []
    guard = NonFiniteGuard(CPU, "skip", 10, log=messages.append)
    dirty_allocator(model)
    opt, metrics = train(model, with_nan, name, accumulate, guard)

    group = bad // accumulate
    dropped = range(group * accumulate, group * accumulate + accumulate)
    ref_opt, ref_metrics = train(reference, [b for i, b in enumerate(batches) if i not in dropped],
                                 name, accumulate)
    for (key, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=key)
    for a, b in zip(opt.state_dict()["state"].values(), ref_opt.state_dict()["state"].values(),
                    strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)
    assert metrics["loss"] == pytest.approx(ref_metrics["loss"], rel=1e-6)
    assert metrics["acc"] == pytest.approx(ref_metrics["acc"])
    assert guard.seen == 1 and guard.report is not None
    assert (guard.report.reason, guard.report.step, guard.report.epoch) == ("loss", group + 1, 1)
    assert any("skipped 1 optimizer step(s)" in m for m in messages), messages


class NanLossAt(ClassificationTask):
    """A NaN loss at one training call whose gradient is still finite (the NaN is detached)."""

    def __init__(self, at: int):
        super().__init__(3)
        self.at, self.calls = at, 0

    def loss(self, outputs, targets, train=True):
        value = super().loss(outputs, targets, train)
        if train:
            self.calls += 1
            if self.calls == self.at:
                return value + math.nan * value.detach()
        return value


@pytest.mark.parametrize("scaler", [False, True])
def test_a_non_finite_loss_with_a_finite_gradient_is_skipped_too(scaler):
    """Without GradScaler the loss flag gates the fused step; with it (here on a CPU, as on CUDA) the
    flag poisons a gradient so that the scaler's own check skips the step."""
    results = []
    for task, batches in ((NanLossAt(3), data(5)), (ClassificationTask(3), data(5)[:2] + data(5)[3:])):
        model = Net()
        opt = make_optimizer("adamw", model)
        grad_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=scaler)
        precision = Precision(device_type="cpu", dtype=None, scaler=grad_scaler)
        guard = NonFiniteGuard(CPU, "skip", log=lambda _: None)
        train_one_epoch(model, task, batches, opt, Schedule(opt, "none", epochs=1, steps_per_epoch=5),
                        precision, CPU, StepConfig(show_progress=False, guard=guard), TrainState())
        results.append((model, grad_scaler.get_scale() if scaler else None, guard.seen))
    (model, scale, seen), (reference, ref_scale, _) = results
    assert seen == 1
    if scaler:
        assert (scale, ref_scale) == (512.0, 1024.0)  # the scaler skipped it (and halved its scale)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


class Counting(list):
    """Batches that count how many were handed out."""
    taken = 0

    def __iter__(self):
        for batch in list.__iter__(self):
            self.taken += 1
            yield batch


def test_stop_comes_at_the_next_log_interval_naming_epoch_and_step():
    batches = Counting(data(8))
    batches[2] = poisoned(batches[2])
    guard = NonFiniteGuard(CPU, "stop")
    with pytest.raises(NonFiniteStop) as info:
        train(Net(), batches, guard=guard, log_interval=2)
    assert batches.taken == 4  # read after batches 2 and 4: found at the second read, not at the end
    text = str(info.value)
    assert text.startswith("training stopped: the loss was not finite (NaN or infinity) at epoch 1, "
                           "step 3 (step 3 of 8 in the epoch)"), text
    assert "--nan-policy skip" in text and "--lr" in text


@pytest.mark.parametrize("clip", [None, 1.0])
def test_a_non_finite_gradient_with_a_finite_loss_is_caught(clip):
    model = Net()
    calls = {"n": 0}

    def nan_at_third_step(grad):
        calls["n"] += 1
        return grad * math.nan if calls["n"] == 3 else grad

    model.body[5].weight.register_hook(nan_at_third_step)
    with pytest.raises(NonFiniteStop) as info:
        train(model, data(5), guard=NonFiniteGuard(CPU, "stop"), clip=clip)
    report = info.value.report
    assert (report.reason, report.step) == ("gradient", 3)
    assert "the gradient was not finite" in str(info.value)


@pytest.mark.parametrize("n_bad, stops", [(2, False), (3, True)])
def test_skips_are_bounded_by_max_skips(n_bad, stops):
    batches = [poisoned(b) if 1 <= i <= n_bad else b for i, b in enumerate(data(6))]
    guard = NonFiniteGuard(CPU, "skip", 2, log=lambda _: None)
    if not stops:
        train(Net(), batches, guard=guard)
        assert guard.seen == 2
        return
    with pytest.raises(NonFiniteStop) as info:
        train(Net(), batches, guard=guard)
    assert str(info.value).startswith("training stopped: 3 optimizer steps had a non-finite loss or "
                                      "gradient, more than --nan-max-skips 2; the first: the loss was "
                                      "not finite (NaN or infinity) at epoch 1, step 2")


def test_weights_that_turn_non_finite_from_finite_steps_stop_the_run_naming_the_tensor():
    model = Net()
    calls = {"n": 0}

    def overflow_running_var(module, inputs):  # before the second forward: no step sees it
        calls["n"] += 1
        if calls["n"] == 2:
            module.body[1].running_var[1] = math.inf

    model.register_forward_pre_hook(overflow_running_var)
    with pytest.raises(NonFiniteStop) as info:
        train(model, data(3), guard=NonFiniteGuard(CPU, "skip", log=lambda _: None))
    assert info.value.report.reason == "weights"
    assert "(buffer body.1.running_var holds NaN or infinity)" in str(info.value)


class NanOnceThenOOM(nn.Module):
    """The first forward returns NaN, the second runs out of memory (a chunk larger than 4): the
    out-of-memory replay of the group sees clean batches only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = TinyMLP(3, pool=4, hidden=16)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2 and x.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        out = self.inner(x)
        return out * math.nan if self.calls == 1 else out


def test_an_out_of_memory_replay_forgets_the_aborted_attempts_flag():
    batches = data(4, size=8)
    model = NanOnceThenOOM()
    reference = copy.deepcopy(model.inner)
    guard = NonFiniteGuard(CPU, "skip", log=lambda _: None)
    train(model, batches, "sgd", accumulate=2, guard=guard, recovery=OOMRecovery(8, 2, lambda _: None))
    train(reference, batches, "sgd", accumulate=2)
    assert guard.seen == 0
    for a, b in zip(model.inner.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class Validation:
    """Targets all class 0; from the second epoch on, NaN inputs: NaN logits, whose argmax is 0, so
    the accuracy reads 100% while the loss is NaN."""

    def __init__(self):
        self.epochs = 0
        g = torch.Generator().manual_seed(3)
        self.batches = [(torch.randn(6, 3, 8, 8, generator=g), torch.zeros(6, dtype=torch.long))]

    def __iter__(self):  # a generator: counted when iterated (tqdm also calls iter() once up front)
        self.epochs += 1
        yield from (self.batches if self.epochs == 1 else [poisoned(b) for b in self.batches])


def test_a_non_finite_validation_loss_is_never_the_best():
    torch.manual_seed(5)
    model = TinyMLP(3, pool=4, hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    improved: list[bool] = []
    messages: list[str] = []
    state = fit(model, ClassificationTask(3), data(2), Validation(), opt,
                Schedule(opt, "none", epochs=2, steps_per_epoch=2), make_precision(CPU, amp=False), CPU,
                epochs=2, state=TrainState(), step_cfg=StepConfig(show_progress=False),
                on_epoch_end=lambda s, r, better: improved.append(better), log=messages.append)
    assert state.history[0]["val_acc"] < 1.0 and state.history[1]["val_acc"] == 1.0
    assert math.isnan(state.history[1]["val_loss"])
    assert improved == [True, False] and state.best_epoch == 1
    assert "warning: epoch 2: val loss is nan; this epoch cannot be the best model" in messages
    assert not TrainState().improved(math.inf, 0.0)


class Indexed(torch.utils.data.Dataset):
    def __len__(self):
        return 13

    def __getitem__(self, i):
        return torch.zeros(1), i


def test_sample_indices_replay_every_ranks_batch():
    loaders = [make_loader(Indexed(), 3, train=True, num_workers=0, pin_memory=False, seed=7, rank=r,
                           world_size=2) for r in range(2)]
    for loader in loaders:
        loader.sampler.set_epoch(4)
    seen = [[y.tolist() for _, y in loader] for loader in loaders]
    assert sample_indices(loaders[0], [1, 2]) == {0: seen[0][1] + seen[0][2], 1: seen[1][1] + seen[1][2]}
    assert sample_indices(list(loaders[0]), [0]) is None  # a plain list: no order to replay


# ---------------------------------------------------------------------------- the scripts


def _for_batchnorm_start() -> bool:
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return False
        if frame.f_code.co_name == "_first_inputs":
            return True
        frame = frame.f_back
    return False


def poison_file(monkeypatch, cls, path_of, pick):
    """cls.__getitem__ returns NaN inputs for one file at its second read (the second epoch).
    pick(dataset) -> the file to poison, or None for a data set left alone."""
    reads: collections.Counter = collections.Counter()
    chosen: dict[str, str] = {}
    original = cls.__getitem__

    def getitem(self, index):
        x, y = original(self, index)
        if _for_batchnorm_start():  # the from-scratch BatchNorm start reads a batch before epoch 1
            return x, y
        path = str(path_of(self, index))
        if "file" not in chosen and pick(self):
            chosen["file"] = path
        reads[path] += 1
        if path == chosen.get("file") and reads[path] == 2:
            x = torch.full_like(x, math.nan)
        return x, y

    monkeypatch.setattr(cls, "__getitem__", getitem)
    return chosen


def all_finite(path: Path) -> bool:
    state = load_checkpoint(path)["state_dict"]
    return all(bool(torch.isfinite(t).all()) for t in state.values() if torch.is_floating_point(t))


def error_lines(err: str) -> list[str]:
    """The `error:` lines of stderr (the progress bars also write there)."""
    return [part for line in err.splitlines() for part in line.split("\r") if part.startswith("error:")]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "dataset"
    make_folder(root / "train", per_class=16, seed=1)
    make_folder(root / "val", per_class=6, seed=2)
    return root


def run_gpu_train(folder: Path, out: Path, *extra: str) -> int:
    return gpu_train.main(["--data-dir", str(folder), "--output", str(out), *FAST, "--epochs", "3",
                           "--data-cache", "off", *extra])


def test_gpu_train_stops_keeping_the_last_good_checkpoint(folder, tmp_path, monkeypatch, capsys):
    chosen = poison_file(monkeypatch, images_mod.ImageDataset, lambda d, i: d.samples[i][0],
                         lambda d: "train" in str(d.samples[0][0]))
    out = tmp_path / "out"
    assert run_gpu_train(folder, out, "--log-interval", "100") == 2  # found by the epoch-end read
    err = capsys.readouterr().err
    report = json.loads((out / "nonfinite_batch.json").read_text())
    assert (report["epoch"], report["reason"], report["policy"]) == (2, "loss", "stop")
    assert chosen["file"] in [s["file"] for s in report["samples"]]
    assert len(report["samples"]) == 8 and 4 < report["step"] <= 8
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: training stopped: the loss was not finite (NaN or infinity) at "
                               f"epoch 2, step {report['step']} "), lines[0]
    assert f"its 8 sample(s) are listed in {out / 'nonfinite_batch.json'}" in lines[0]
    assert f"{out / 'checkpoint.pth'} (epoch 1) and {out / 'best_model.pth'} are intact" in lines[0]
    ckpt = load_checkpoint(out / "checkpoint.pth", need_train_state=True)
    assert ckpt["train_state"]["epoch"] == 1
    assert all_finite(out / "checkpoint.pth") and all_finite(out / "best_model.pth")
    assert [r["epoch"] for r in read_rows(out / "metrics.csv")] == ["1"]


def test_gpu_train_skip_finishes_with_finite_weights_and_says_so(folder, tmp_path, monkeypatch):
    chosen = poison_file(monkeypatch, images_mod.ImageDataset, lambda d, i: d.samples[i][0],
                         lambda d: "train" in str(d.samples[0][0]))
    out = tmp_path / "out"
    assert run_gpu_train(folder, out, "--nan-policy", "skip") == 0
    log = (out / "training.log").read_text()
    assert "reads a flag on the host" not in log  # a fused optimizer on the CPU: skipped on the device
    assert "warning: epoch 2: skipped 1 optimizer step(s) whose loss or gradient was not finite " \
           "(1 so far, at most --nan-max-skips 10)" in log
    report = json.loads((out / "nonfinite_batch.json").read_text())
    assert (report["epoch"], report["policy"], report["nonfinite_steps"]) == (2, "skip", 1)
    assert chosen["file"] in [s["file"] for s in report["samples"]]
    assert all_finite(out / "checkpoint.pth") and all_finite(out / "best_model.pth")
    rows = read_rows(out / "metrics.csv")
    assert len(rows) == 3 and all(math.isfinite(float(r["train_loss"])) for r in rows)


def poison_cached_row(monkeypatch, row: int) -> None:
    """The data cache's training batches: NaN inputs for the batch holding cached row `row`, the
    second time it is drawn (the second epoch)."""
    from common.data.device_batches import CachedBatches

    original, seen = CachedBatches._batch, collections.Counter()

    def batch(self, host, dev, params):
        x, y = original(self, host, dev, params)
        if self.train and row in host.tolist():
            seen[row] += 1
            if seen[row] == 2:
                x = torch.full_like(x, math.nan)
        return x, y

    monkeypatch.setattr(CachedBatches, "_batch", batch)


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_the_report_names_the_files_on_the_data_cache_path_too(folder, tmp_path, monkeypatch, task):
    poison_cached_row(monkeypatch, 3)
    out = tmp_path / "out"
    if task == "classification":
        train = images_mod.folder_splits(folder, 0.2, 42).train
        expected = {"file": str(train[3][0])}
        code = gpu_train.main(["--data-dir", str(folder), "--output", str(out), *FAST, "--epochs", "3",
                               "--data-cache", "ram"])
    else:
        shapes = make_shapes_dataset(tmp_path / "shapes", n=24, size=32)
        image, mask = segmentation_mod.split_pairs(segmentation_mod.find_pairs(shapes), 25, 42)[0][3]
        expected = {"file": str(image), "mask": str(mask)}
        code = train_unet.main(["--data-dir", str(shapes), "--output", str(out), "-e", "3", "-b", "4",
                                "-v", "25", "--data-cache", "ram", "-s", "1", "--width", "8",
                                "--num-workers", "0"])
    assert code == 2
    report = json.loads((out / "nonfinite_batch.json").read_text())
    assert "files" not in report  # no "file names not known" note
    assert {"rank": 0, "index": 3, **expected} in report["samples"], report["samples"]
    assert all("file" in sample for sample in report["samples"])


def test_cached_rows_keep_their_files_when_a_skipped_image_is_left_out(tmp_path):
    from common.data.cache import ImageCache
    from common.data.fast_path import _kept_files

    samples = [(str(tmp_path / f"{i}.png"), 0) for i in range(4)]
    dataset = images_mod.ImageDataset(samples, transform=lambda image: image)
    cache = ImageCache(torch.zeros(3, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64),
                       None, None, False, bad=[(samples[1][0], "cannot be decoded")])
    assert _kept_files(dataset, cache) == [{"file": samples[i][0]} for i in (0, 2, 3)]
    assert _kept_files(object(), cache) is None  # a torchvision set: no files


def test_a_learning_rate_that_diverges_stops_with_one_line(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert gpu_train.main(["--data-dir", str(folder), "--output", str(out), *FAST, "--epochs", "3",
                           "--optimizer", "sgd", "--lr", "1e3"]) == 2
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: training stopped: "), err
    assert "--lr" in lines[0] and "Traceback" not in err
    assert "* best" not in (out / "training.log").read_text()
    for name in ("checkpoint.pth", "best_model.pth"):
        assert not (out / name).exists() or all_finite(out / name)


def test_nan_max_skips_below_zero_is_refused(folder, tmp_path, capsys):
    assert run_gpu_train(folder, tmp_path / "o", "--nan-max-skips", "-1") == 2
    assert "error: --nan-max-skips must be a number >= 0, got -1" in capsys.readouterr().err


def test_train_unet_stops_naming_image_and_mask(tmp_path, monkeypatch, capsys):
    shapes = make_shapes_dataset(tmp_path / "shapes", n=24, size=32)
    chosen = poison_file(monkeypatch, segmentation_mod.SegmentationDataset, lambda d, i: d.pairs[i][0],
                         lambda d: len(d) > 6)  # the training pairs (18 of 24 with -v 25)
    out = tmp_path / "out"
    code = train_unet.main(["--data-dir", str(shapes), "--output", str(out), "-e", "3", "-b", "4",
                            "-v", "25", "--data-cache", "off", "-s", "1", "--width", "8", "-l", "3e-3",
                            "--num-workers", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "error: training stopped: the loss was not finite (NaN or infinity) at epoch 2, step" in err
    report = json.loads((out / "nonfinite_batch.json").read_text())
    sample = next(s for s in report["samples"] if s["file"] == chosen["file"])
    assert Path(sample["mask"]).parent.name == "masks"
    assert load_checkpoint(out / "checkpoint.pth", need_train_state=True)["train_state"]["epoch"] == 1
    assert all_finite(out / "checkpoint.pth") and all_finite(out / "best_model.pth")


def test_under_ddp_every_rank_stops_when_one_rank_sees_a_nan_loss(folder, tmp_path):
    """Rank 1 alone has the NaN (its gradient is finite, so the all-reduced gradients say nothing):
    the count all-reduced at the epoch-end read stops rank 0 too, which writes the report of both
    ranks' samples (it would otherwise train on and hang in the next collective); checkpoint.pth of
    epoch 1 stays."""
    from test_distributed import SCRIPTS, torchrun

    out = tmp_path / "o"
    result = torchrun(SCRIPTS / "nan_loss_rank1.py", "--data-dir", str(folder), "--output", str(out),
                      *FAST, "--epochs", "3", "--log-interval", "100", timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    expected = "error: training stopped: the loss was not finite (NaN or infinity) at epoch 2, step 3 "
    assert expected in output, output[-3000:]
    report = json.loads((out / "nonfinite_batch.json").read_text())  # rank 0 learned it from the read
    assert (report["epoch"], report["step"]) == (2, 3)
    assert sorted({s["rank"] for s in report["samples"]}) == [0, 1] and len(report["samples"]) == 16
    assert load_checkpoint(out / "checkpoint.pth", need_train_state=True)["train_state"]["epoch"] == 1
    assert all_finite(out / "checkpoint.pth")
