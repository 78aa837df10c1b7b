"""The decode-once data path inside the training scripts, the CIFAR-10 recipe, MixUp/CutMix,
the weights' moving average, --devices and the background checkpoint writes."""
from __future__ import annotations

import errno
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST
from PIL import Image

import gpu_train
import train_unet
from common import checkpoint as ckpt_lib
from common import launch
from common import session as session_mod
from common.classify import resolve_args
from common.data.batch_aug import BatchAugment
from common.data.device_batches import CachedBatches
from common.data.segmentation import make_shapes_dataset
from common.ema import EMA
from common.errors import UserError
from common.mixing import make_mixer
from common.recipes import CIFAR10
from common.tasks import ClassificationTask


def run(dataset: Path, out: Path, *extra: str) -> int:
    return gpu_train.main(["--data-dir", str(dataset), "--output", str(out), *FAST, *extra])


# ------------------------------------------------------------------ the cached batches


def test_cached_batches_shard_every_sample_and_draw_new_parameters_each_epoch():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 4, 4).contiguous()
    labels = torch.arange(10)
    aug = BatchAugment(4, (0.0,) * 3, (1 / 255,) * 3, kind="flip")  # output = pixel values
    shards = [CachedBatches(images, labels, 3, augment=aug, train=True, device="cpu", seed=1,
                            rank=r, world_size=2) for r in range(2)]
    seen = []
    for loader in shards:
        assert len(loader) == 2  # 5 samples per rank, batches of 3
        for x, y in loader:
            assert torch.equal(x[:, 0, 0, 0].round().long(), y)  # the image belongs to its label
            seen += y.tolist()
    assert sorted(seen) == list(range(10))
    one = CachedBatches(images, labels, 10, augment=BatchAugment(4, (0.0,) * 3, (1.0,) * 3),
                        train=True, device="cpu", seed=1)
    noisy = images.clone()
    noisy[:, :, 0, 0] = 255  # a marked corner shows the geometry each sample got
    one.images = noisy
    first = [next(iter(one))[0] for _ in range(2)]
    assert torch.equal(first[0], first[1])  # same epoch: the same parameters
    one.sampler.set_epoch(1)
    assert not torch.equal(next(iter(one))[0], first[0])  # next epoch: new ones


def test_batches_are_made_on_one_cpu_thread_and_the_step_keeps_all_of_them(monkeypatch):
    images = torch.randint(0, 256, (8, 3, 9, 9), dtype=torch.uint8)
    aug = BatchAugment(7, (0.0,) * 3, (1.0,) * 3, kind="standard")
    seen = []
    real_apply = aug.apply

    def counting(*a, **k):
        seen.append(torch.get_num_threads())
        return real_apply(*a, **k)

    monkeypatch.setattr(aug, "apply", counting)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        loader = CachedBatches(images, torch.arange(8), 4, augment=aug, train=True, device="cpu")
        for _ in loader:
            assert torch.get_num_threads() == 2  # the training step between two batches
    finally:
        torch.set_num_threads(threads)
    assert seen == [1, 1]


def test_validation_batches_are_the_center_crops_in_order():
    images = torch.randint(0, 256, (5, 3, 9, 9), dtype=torch.uint8)
    loader = CachedBatches(images, torch.arange(5), 2, augment=BatchAugment(7, (0.0,) * 3, (1.0,) * 3,
                           kind="eval"), train=False, device="cpu")
    xs, ys = zip(*loader, strict=True)
    assert torch.equal(torch.cat(ys), torch.arange(5))
    torch.testing.assert_close(torch.cat(xs), images[:, :, 1:8, 1:8].float() / 255)


@pytest.mark.parametrize("cache", ["off", "ram"])
def test_resume_equals_an_uninterrupted_run_bit_for_bit(dataset, tmp_path, monkeypatch, cache, capsys):
    flags = ["--epochs", "3", "--deterministic", "--data-cache", cache, "--ema", "0.9", "--mixup", "0.4"]
    assert run(dataset, tmp_path / "full", *flags) == 0
    log = capsys.readouterr().out
    assert ("data cache: in RAM" in log) == (cache == "ram")
    original = session_mod.EpochWriter.__call__

    def stop_after_one(self, state, record, improved):
        original(self, state, record, improved)
        if state.epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(session_mod.EpochWriter, "__call__", stop_after_one)
    assert run(dataset, tmp_path / "cut", *flags) == 130
    monkeypatch.setattr(session_mod.EpochWriter, "__call__", original)
    assert gpu_train.main(["--resume", str(tmp_path / "cut" / "checkpoint.pth")]) == 0
    full = ckpt_lib.load_checkpoint(tmp_path / "full" / "checkpoint.pth")
    resumed = ckpt_lib.load_checkpoint(tmp_path / "cut" / "checkpoint.pth")
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    for key, value in full["train_state"]["ema"]["state_dict"].items():
        assert torch.equal(value, resumed["train_state"]["ema"]["state_dict"][key]), f"ema {key}"


def test_cached_and_loader_paths_reach_the_same_accuracy(dataset, tmp_path):
    accs = {}
    for cache in ("off", "auto"):
        assert run(dataset, tmp_path / cache, "--epochs", "4", "--data-cache", cache) == 0
        accs[cache] = ckpt_lib.load_checkpoint(tmp_path / cache / "best_model.pth")["metrics"]["val_acc"]
    assert min(accs.values()) > 0.75, accs  # two easy classes, both ways well above chance


def test_a_corrupt_image_found_while_caching(dataset, tmp_path, capsys):
    bad = dataset / "train" / "top" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    assert run(dataset, tmp_path / "out", "--check-images", "off", "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert "broken.png cannot be decoded" in err and "--skip-bad-images" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert run(dataset, tmp_path / "out", "--check-images", "off", "--epochs", "1", "--skip-bad-images") == 0
    assert "broken.png" in (tmp_path / "out" / "bad_images.txt").read_text()


def test_segmentation_trains_from_the_cache(tmp_path, capsys):
    data = make_shapes_dataset(tmp_path / "shapes", n=24, size=32)
    out = tmp_path / "unet"
    code = train_unet.main(["--data-dir", str(data), "--output", str(out), "-e", "2", "-b", "4",
                            "-s", "1.0", "--width", "8", "--num-workers", "0", "-l", "1e-3"])
    assert code == 0
    log = capsys.readouterr().out
    assert "data cache: in RAM" in log
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and "val_dice" in rows[0]


# ------------------------------------------------------------------ the recipe


def recipe_args(*argv: str):
    return resolve_args(gpu_train.build_parser(), list(argv))[0]


def test_the_cifar10_recipe_resolves_to_the_notes_values():
    args = recipe_args("--recipe", "cifar10")
    expected = {"model": "cifar_resnet", "batch_size": 128, "optimizer": "adamw", "amsgrad": True,
                "lr": 0.002, "scheduler": "warmrestart", "t0": 40, "t_mult": 1, "epochs": 150,
                "clip_grad": 1.0, "mixup": 1.0, "mix_prob": 0.5, "early_stopping_patience": 50,
                "min_delta": 2e-4, "augment": "cifar", "amp": True, "test": True, "img_size": 32}
    assert {k: getattr(args, k) for k in expected} == expected
    assert set(CIFAR10) >= set(expected)
    overridden = recipe_args("--recipe", "cifar10", "--epochs", "3", "--lr", "0.01")
    assert (overridden.epochs, overridden.lr, overridden.batch_size) == (3, 0.01, 128)
    plain = recipe_args()
    assert (plain.model, plain.batch_size, plain.mixup) == ("efficientnet_b0", 32, 0.0)


def test_a_config_file_overrides_the_recipe(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"batch_size": 64}))
    args = recipe_args("--recipe", "cifar10", "--config", str(config))
    assert (args.batch_size, args.lr) == (64, 0.002)


def test_unknown_recipe_lists_the_known_ones(capsys):
    assert gpu_train.main(["--recipe", "imagenet"]) == 2
    assert "unknown --recipe 'imagenet'; known recipes: cifar10" in capsys.readouterr().err
    assert gpu_train.main(["--recipe", "list"]) == 0
    out = capsys.readouterr().out
    assert "cifar10:" in out and "--model cifar_resnet" in out and "--mix-prob 0.5" in out


def write_fake_cifar(root: Path, monkeypatch, train: int = 40, test: int = 20) -> Path:
    """torchvision's CIFAR-10 python batches with generated 32 px pictures (class = the column of
    a bright bar), the md5 checks of the real files switched off."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n):
        labels = rng.integers(0, 10, n)
        data = rng.integers(0, 60, (n, 3, 32, 32)).astype(np.uint8)
        for img, label in zip(data, labels, strict=True):
            img[:, :, 3 * label:3 * label + 3] = 240
        return {"data": data.reshape(n, -1), "labels": labels.tolist()}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(train // 5)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(test)))
    names = [f"class{i}" for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return root


def test_two_epochs_of_the_recipe_train_and_evaluate_on_the_test_set(tmp_path, monkeypatch, capsys):
    data = write_fake_cifar(tmp_path / "data", monkeypatch)
    out = tmp_path / "out"
    assert gpu_train.main(["--recipe", "cifar10", "--dataset", "cifar10", "--data-dir", str(data),
                           "--output", str(out), "--epochs", "2", "--batch-size", "16",
                           "--num-workers", "0"]) == 0
    log = capsys.readouterr().out
    assert "recipe cifar10: model=cifar_resnet img_size=32 batch_size=16" in log
    assert "overridden on the command line: batch_size, epochs" in log
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"] == "cifar10" and config["mix_prob"] == 0.5 and config["t0"] == 40
    test = json.loads((out / "test_metrics.json").read_text())
    assert test["images"] == 20 and 0.0 <= test["acc"] <= 1.0
    assert f"test: accuracy {100 * test['acc']:.2f}%" in log
    best = ckpt_lib.load_checkpoint(out / "best_model.pth")
    assert best["model"]["name"] == "cifar_resnet" and best["preprocessing"]["img_size"] == 32


# ------------------------------------------------------------------ MixUp, CutMix, EMA


def test_mixup_and_cutmix_come_from_torchvision_and_mix_whole_batches():
    assert make_mixer(10, 0.0, 0.0, 1.0) is None and make_mixer(10, 0.4, 0.0, 0.0) is None
    mixer = make_mixer(4, 0.4, 0.0, 1.0)
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    mixed, soft = mixer(x, y)
    assert soft.shape == (6, 4) and torch.allclose(soft.sum(1), torch.ones(6))
    weight = soft[0, 0]  # sample 0 is mixed with sample 5 (torchvision rolls the batch by one)
    torch.testing.assert_close(mixed[0], weight * x[0] + (1 - weight) * x[5])
    torch.manual_seed(0)
    never = make_mixer(4, 0.0, 1.0, 0.5)
    kept = sum(never(x, y)[1].dim() == 1 for _ in range(200))
    assert 60 < kept < 140  # --mix-prob 0.5: about half the batches untouched


def test_training_accuracy_counts_the_dominant_class_of_a_mixed_target():
    task = ClassificationTask(3)
    totals = task.new_totals(torch.device("cpu"), train=True)
    outputs = torch.tensor([[5.0, 0, 0], [0, 5.0, 0]])
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.6, 0.4, 0.0]])
    task.accumulate(totals, outputs, soft, task.loss(outputs, soft))
    assert int(totals["correct"]) == 1 and int(totals["count"]) == 2


@pytest.mark.parametrize("flags, message", [
    (["--mixup", "-1"], "--mixup must be a number >= 0, got -1.0"),
    (["--mixup", "0.2", "--mix-prob", "1.5"], "--mix-prob must be a number >= 0 and <= 1, got 1.5"),
    (["--ema", "1"], "--ema must be a number > 0 and < 1, got 1.0"),
])
def test_bad_regularisation_values_are_one_line_before_the_folder_is_touched(dataset, tmp_path, capsys,
                                                                             flags, message):
    out = tmp_path / "out"
    assert run(dataset, out, "--epochs", "1") == 0
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert run(dataset, out, "--epochs", "1", *flags) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n"
    assert sorted(p.name for p in out.iterdir()) == before  # no previous_run_* made


def test_ema_is_the_library_formula_without_reading_the_counter():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(model, 0.75)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model[1].num_batches_tracked += 3
    ema.update()
    for key, value in ema.module.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.75 * start[key] + 0.25 * model.state_dict()[key])
        else:
            assert torch.equal(value, model.state_dict()[key]), key
    assert int(ema.averaged.n_averaged) == 0  # update() never touched (or read) the counter


def test_the_moving_average_is_saved_as_the_best_model_when_it_is_better(dataset, tmp_path, monkeypatch):
    from common import engine

    real = engine.evaluate

    def ema_always_better(model, task, loader, *a, **k):
        totals = real(model, task, loader, *a, **k)
        if getattr(model, "_is_ema", False):
            totals["correct"] = totals["count"].clone()  # the EMA scores 100%, the model 0%
        else:
            totals["correct"] = torch.zeros_like(totals["count"])
        return totals

    original_init = EMA.__init__

    def marked_init(self, model, decay):
        original_init(self, model, decay)
        self.module._is_ema = True

    monkeypatch.setattr(engine, "evaluate", ema_always_better)
    monkeypatch.setattr(EMA, "__init__", marked_init)
    assert run(dataset, tmp_path / "out", "--epochs", "1", "--ema", "0.5") == 0
    best = ckpt_lib.load_checkpoint(tmp_path / "out" / "best_model.pth")
    ckpt = ckpt_lib.load_checkpoint(tmp_path / "out" / "checkpoint.pth")
    assert best["metrics"]["val_acc"] == 1.0 and ckpt["train_state"]["best_from_ema"]
    for key, value in ckpt["train_state"]["ema"]["state_dict"].items():
        assert torch.equal(best["state_dict"][key], value), key  # the EMA weights, not the model's


# ------------------------------------------------------------------ --devices


def test_devices_flag_reads_like_lightning():
    assert launch.parse_devices("0,1", 4) == [0, 1]
    assert launch.parse_devices("2", 4) == [0, 1]
    assert launch.parse_devices("auto", 3) == [0, 1, 2]
    assert launch.parse_devices("[1, 3]", 4) == [1, 3]
    for bad in ("0,5", "x", "0,0", "0"):
        with pytest.raises(UserError):
            launch.parse_devices(bad, 4)


def test_devices_0_1_launches_two_processes_on_those_gpus(monkeypatch, capsys):
    calls = {}
    monkeypatch.setattr(launch, "_gpus", lambda no_gpu: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def fake_call(cmd, env=None):
        calls.update(cmd=cmd, env=env)
        return 0

    monkeypatch.setattr(launch.subprocess, "call", fake_call)
    assert gpu_train.main(["--devices", "0,1", "--demo", "--epochs", "1"]) == 0
    assert "--nproc-per-node=2" in calls["cmd"] and calls["env"]["CUDA_VISIBLE_DEVICES"] == "4,5"
    assert calls["cmd"][-5:] == ["--devices", "0,1", "--demo", "--epochs", "1"]


def test_devices_without_a_gpu_trains_in_this_process(dataset, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert run(dataset, tmp_path / "out", "--epochs", "1", "--devices", "0,1") == 0
    assert "--devices 0,1: no GPU visible, training on the CPU in one process" in capsys.readouterr().out
    assert run(dataset, tmp_path / "out2", "--epochs", "1", "--devices", "abc") == 2  # a typo: now
    assert "--devices 'abc': expected auto" in capsys.readouterr().err


def test_ctrl_c_says_which_checkpoint_is_intact_or_that_there_is_none(dataset, tmp_path, monkeypatch,
                                                                      capsys):
    from common import engine, errors

    monkeypatch.setattr(errors, "_SAVED", {})
    real = engine.train_one_epoch
    calls = {"n": 0}

    def interrupt_in_epoch(n):
        def fake(*a, **k):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return real(*a, **k)
        return fake

    monkeypatch.setattr(engine, "train_one_epoch", interrupt_in_epoch(1))
    assert run(dataset, tmp_path / "a", "--epochs", "3") == 130
    assert "interrupted before the first checkpoint was saved: nothing to resume" in capsys.readouterr().err
    calls["n"] = 0
    monkeypatch.setattr(engine, "train_one_epoch", interrupt_in_epoch(3))
    assert run(dataset, tmp_path / "b", "--epochs", "3") == 130
    saved = tmp_path / "b" / "checkpoint.pth"
    err = capsys.readouterr().err
    assert f"interrupted: {saved} (epoch 2) is intact; continue with --resume {saved}" in err
    assert ckpt_lib.load_checkpoint(saved)["train_state"]["epoch"] == 2


@pytest.mark.skipif(os.name != "posix", reason="sends SIGTERM")
def test_sigterm_ends_a_run_as_ctrl_c_does_with_its_closing_line(dataset, tmp_path):
    """kill, docker stop and a scheduler's time limit send SIGTERM: the run stops as on Ctrl+C (the
    checkpoint intact, the line that says how to go on), with exit code 143 (128 + SIGTERM)."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "gpu_train.py"), "--data-dir",
           str(dataset), "--output", str(out), *FAST, "--epochs", "500"]
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pth").is_file() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)  # somewhere in a later epoch, maybe inside a save
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 143, err[-2000:]
    saved = out / "checkpoint.pth"
    assert f"interrupted: {saved} (epoch " in err and f"continue with --resume {saved}" in err, err[-2000:]
    assert "Traceback" not in err
    epoch = int(err.split(f"interrupted: {saved} (epoch ", 1)[1].split(")", 1)[0])
    assert ckpt_lib.load_checkpoint(saved, need_train_state=True)["train_state"]["epoch"] == epoch


# ------------------------------------------------------------------ saving beside training


def test_best_model_is_written_before_the_checkpoint_that_names_it(dataset, tmp_path, monkeypatch):
    import threading

    order = []
    real = ckpt_lib.atomic_save

    def recording(obj, path):
        order.append((Path(path).name, threading.current_thread() is threading.main_thread()))
        real(obj, path)

    monkeypatch.setattr(ckpt_lib, "atomic_save", recording)
    monkeypatch.setattr("common.saver.atomic_save", recording)
    assert run(dataset, tmp_path / "out", "--epochs", "2") == 0
    names = [name for name, _ in order]
    assert names[:2] == ["best_model.pth", "checkpoint.pth"]  # epoch 1 improves from nothing
    assert not any(main for _, main in order), "a checkpoint was written on the training thread"


def test_a_failed_background_write_is_one_line_and_the_previous_checkpoint_stays(dataset, tmp_path,
                                                                                  monkeypatch, capsys):
    real = ckpt_lib.atomic_save
    calls = {"n": 0}

    def full_on_the_second_checkpoint(obj, path):
        if Path(path).name == "checkpoint.pth":
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(obj, path)

    monkeypatch.setattr("common.saver.atomic_save", full_on_the_second_checkpoint)
    out = tmp_path / "out"
    assert run(dataset, out, "--epochs", "3") == 2
    err = capsys.readouterr().err
    line = err[err.index("error: "):]  # after the progress bars
    assert line.startswith(f"error: could not write {out / 'checkpoint.pth'}: the disk is full (about ")
    assert "MB needed); the previous checkpoint.pth" in line and "--resume" in line
    assert line.count("\n") == 1 and err.count("error:") == 1 and "Traceback" not in err
    assert ckpt_lib.load_checkpoint(out / "checkpoint.pth")["train_state"]["epoch"] == 1
    assert not (out / ".toolkit.lock").exists()  # the folder is free again


def test_exif_orientation_is_applied_on_both_paths(tmp_path):
    from common.data.cache import decode_rgb_uint8
    from common.data.images import load_rgb

    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    path = tmp_path / "phone.jpg"
    img.save(path, exif=exif, quality=100)
    upright = np.asarray(load_rgb(path))
    assert upright.shape[:2] == (40, 20)
    cached = decode_rgb_uint8(str(path)).permute(1, 2, 0).numpy()
    assert cached.shape == upright.shape
    assert np.abs(cached.astype(int) - upright.astype(int)).max() <= 40  # JPEG decoders differ a little
