"""finetune_gpu.py: the fine-tuning guide's workflow (rounds that chain, freezing, TensorBoard,
resume, head replacement), the tools on its output, and every bad input of issue 8."""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_folder, make_ten_class

import export_onnx
import finetune_gpu
import gpu_train
import predict
import test_model
import validate
from common.checkpoint import load_checkpoint, make_payload, sha256_of
from common.finetune import resolve_args
from common.models import build_model

BASE_FLAGS = ["--model", "small_cnn", "--img-size", "32", "--batch-size", "16", "--num-workers", "0",
              "--lr", "0.003", "--log-interval", "2"]
FT = ["--batch-size=16", "--num-workers=0", "--log-interval=2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A small_cnn trained 2 epochs on a 10-class set: far from perfect, room to improve."""
    root = tmp_path_factory.mktemp("base")
    data = root / "data"
    make_ten_class(data / "train", per_class=24, seed=1)
    make_ten_class(data / "val", per_class=8, seed=2)
    out = root / "run"
    assert gpu_train.main(["--data-dir", str(data), "--output", str(out), *BASE_FLAGS, "--epochs", "2"]) == 0
    return out / "best_model.pth"


@pytest.fixture
def work(tmp_path, base, monkeypatch) -> Path:
    """A user's folder: model/mnist_cnn3.pt is the base; the guide's commands run from here."""
    (tmp_path / "model").mkdir()
    shutil.copy(base, tmp_path / "model" / "mnist_cnn3.pt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


def tb_tags(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_guide_workflow_improves_chains_and_logs(work, capsys):
    # step 2 of the guide, in its --flag=value form
    assert finetune_gpu.main(["--model-path=model/mnist_cnn3.pt", "--lr=0.003", "--epochs=3",
                              "--scheduler=cosine", *FT]) == 0
    out = capsys.readouterr().out
    first = work / "result" / "mnist_cnn3_finetuned.pt"
    assert first.is_file() and (work / "result" / "checkpoint.pth").is_file()
    lines = out.strip().splitlines()
    before = next(i for i, line in enumerate(lines) if "before fine-tuning: val acc" in line)
    epoch1 = next(i for i, line in enumerate(lines) if "epoch 1/3 |" in line)
    assert before < epoch1
    assert lines[-1].startswith("done: before ")
    assert str(Path("result") / "mnist_cnn3_finetuned.pt") in lines[-1]
    ckpt = load_checkpoint(first, task="classification")
    start = ckpt["finetune"]["start"]["val_acc"]
    assert ckpt["metrics"]["val_acc"] > start  # fine-tuning improved on the loaded model
    assert f"before {100 * start:.2f}% -> after {100 * ckpt['metrics']['val_acc']:.2f}%" in lines[-1]
    assert [int(r["epoch"]) for r in rows(work / "result" / "metrics.csv")] == [1, 2, 3]
    assert (work / "result" / "training.log").read_text().count("before fine-tuning") == 1
    # step 3: TensorBoard in ./logs_finetune, one sub-folder per run
    runs = list((work / "logs_finetune").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("mnist_cnn3_")
    assert {"val/acc", "val/loss", "lr", "train/acc"} <= tb_tags(runs[0])
    # lineage: the base model's file, hash and metrics
    (parent,) = ckpt["lineage"]
    assert parent["file"] == "mnist_cnn3.pt"
    assert parent["sha256"] == sha256_of(work / "model" / "mnist_cnn3.pt")
    assert parent["metrics"]["val_acc"] == pytest.approx(start)

    # scenario 1, second round on the first round's output: a normal checkpoint, so rounds chain
    first_sha = sha256_of(first)
    assert finetune_gpu.main(["--model-path=result/mnist_cnn3_finetuned.pt", "--lr=0.0005", "--epochs=2",
                              "--scheduler=cosine", *FT]) == 0
    second = load_checkpoint(first)
    assert [e["file"] for e in second["lineage"]] == ["mnist_cnn3_finetuned.pt", "mnist_cnn3.pt"]
    assert second["lineage"][0]["sha256"] == first_sha
    assert second["finetune"]["start"]["val_acc"] == pytest.approx(ckpt["metrics"]["val_acc"])
    # nothing the user had is overwritten: the first round is kept as the previous run
    (previous,) = (work / "result").glob("previous_run_*")
    assert sha256_of(previous / "mnist_cnn3_finetuned.pt") == first_sha
    assert len(list((work / "logs_finetune").iterdir())) == 2


def test_tools_accept_the_finetuned_file(work, capsys, tmp_path):
    assert finetune_gpu.main(["--model-path", "model/mnist_cnn3.pt", "--epochs", "1", *FT]) == 0
    model = work / "result" / "mnist_cnn3_finetuned.pt"
    val_dir = Path(load_checkpoint(model)["config"]["data_dir"]) / "val"
    results = tmp_path / "v.json"
    assert validate.main(["--model", str(model), "--data-dir", str(val_dir), "--num-workers", "0",
                          "--results-file", str(results)]) == 0
    assert json.loads(results.read_text())["metrics"]["acc"] == pytest.approx(
        load_checkpoint(model)["metrics"]["val_acc"])
    assert predict.main(["-m", str(model), "-i", str(val_dir / "class_3"), "--topk", "1",
                         "-o", str(tmp_path / "p.csv")]) == 0
    assert len(rows(tmp_path / "p.csv")) == 8
    assert export_onnx.main(["--model", str(model), "--output", str(tmp_path / "m.onnx")]) == 0
    capsys.readouterr()
    assert test_model.main(["--model-path", str(model), "--data-dir", str(val_dir)]) == 0
    assert "all checks passed" in capsys.readouterr().out


def test_freeze_conv_keeps_every_convolution(work, capsys):
    base = weights(work / "model" / "mnist_cnn3.pt")
    assert finetune_gpu.main(["--model-path=model/mnist_cnn3.pt", "--epochs=2", "--freeze-conv",
                              "--lr=0.01", *FT]) == 0
    assert "trainable / " in capsys.readouterr().out
    after = weights(work / "result" / "checkpoint.pth")
    convs = [k for k in base if k.endswith(".0.weight") and base[k].dim() == 4]
    assert len(convs) == 3
    for key in convs:
        assert torch.equal(after[key], base[key]), key
    for key in ("features.0.1.weight", "features.1.1.bias"):  # BN before the last conv: frozen too
        assert torch.equal(after[key], base[key]), key
    assert not torch.equal(after["head.2.weight"], base["head.2.weight"])
    assert not torch.equal(after["features.2.1.weight"], base["features.2.1.weight"])  # after the last conv
    # frozen parameters are not given to the optimizer
    groups = load_checkpoint(work / "result" / "checkpoint.pth")["train_state"]["optimizer"]["param_groups"]
    assert sum(len(g["params"]) for g in groups) == 4  # features.2.1 weight/bias, head weight/bias


def test_freeze_bn_keeps_statistics_and_affine(work):
    base = weights(work / "model" / "mnist_cnn3.pt")
    assert finetune_gpu.main(["--model-path=model/mnist_cnn3.pt", "--epochs=2", "--freeze-bn", *FT]) == 0
    after = weights(work / "result" / "checkpoint.pth")
    bn = [k for k in base if re.match(r"features\.\d\.1\.", k)]
    assert {k.rsplit(".", 1)[1] for k in bn} == {"weight", "bias", "running_mean", "running_var",
                                                 "num_batches_tracked"}
    for key in bn:
        assert torch.equal(after[key], base[key]), key
    assert not torch.equal(after["features.0.0.weight"], base["features.0.0.weight"])


def test_freeze_until_freezes_exactly_the_prefix(work, capsys):
    base = weights(work / "model" / "mnist_cnn3.pt")
    assert finetune_gpu.main(["--model-path=model/mnist_cnn3.pt", "--epochs=1", "--freeze-until",
                              "features.1", *FT]) == 0
    assert "frozen up to features.1" in capsys.readouterr().out
    after = weights(work / "result" / "checkpoint.pth")
    params = [k for k in base if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    for key in params:
        same = torch.equal(after[key], base[key])
        assert same == key.startswith(("features.0.", "features.1.")), key


def test_resume_of_an_interrupted_finetune_equals_an_uninterrupted_one(work, monkeypatch):
    from common import session as session_mod

    flags = ["--model-path=model/mnist_cnn3.pt", "--epochs=3", "--deterministic", "--warmup-epochs=1", *FT]
    assert finetune_gpu.main([*flags, "--output=full", "--log-dir=tb_full"]) == 0
    original = session_mod.EpochWriter.__call__

    def stop_after_two(self, state, record, improved):
        original(self, state, record, improved)
        if state.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(session_mod.EpochWriter, "__call__", stop_after_two)
    assert finetune_gpu.main([*flags, "--output=cut", "--log-dir=tb_cut"]) == 130
    monkeypatch.setattr(session_mod.EpochWriter, "__call__", original)
    assert finetune_gpu.main(["--resume", "cut/checkpoint.pth", "--epochs", "3", "--num-workers", "0"]) == 0
    full = load_checkpoint(work / "full" / "checkpoint.pth")
    cut = load_checkpoint(work / "cut" / "checkpoint.pth")
    for key, value in full["state_dict"].items():
        assert torch.equal(value, cut["state_dict"][key]), key
    assert [r["val_loss"] for r in rows(work / "full" / "metrics.csv")] == \
        [r["val_loss"] for r in rows(work / "cut" / "metrics.csv")]
    assert cut["finetune"]["start"] == full["finetune"]["start"]
    assert len(list((work / "tb_cut").iterdir())) == 1  # the resumed run went on in its own folder


def test_other_classes_replace_the_head(work, capsys):
    other = work / "three"
    make_folder(other / "train", classes=("a", "b", "c"), per_class=10, seed=3)
    make_folder(other / "val", classes=("a", "b", "c"), per_class=4, seed=4)
    base = weights(work / "model" / "mnist_cnn3.pt")
    assert finetune_gpu.main(["--model-path=model/mnist_cnn3.pt", f"--data-dir={other}", "--num-classes=3",
                              "--freeze-conv", "--epochs=1", *FT]) == 0
    assert "new classifier head for the 3 classes" in capsys.readouterr().out
    ckpt = load_checkpoint(work / "result" / "mnist_cnn3_finetuned.pt")
    assert ckpt["classes"] == ["a", "b", "c"] and ckpt["model"]["kwargs"]["num_classes"] == 3
    assert ckpt["state_dict"]["head.2.weight"].shape == (3, 128)
    assert torch.equal(ckpt["state_dict"]["features.0.0.weight"], base["features.0.0.weight"])


def test_plain_state_dict_with_arch(work, tmp_path):
    plain = tmp_path / "weights.pth"
    torch.save(weights(work / "model" / "mnist_cnn3.pt"), plain)
    data_dir = load_checkpoint(work / "model" / "mnist_cnn3.pt")["config"]["data_dir"]
    assert finetune_gpu.main([f"--model-path={plain}", "--arch=small_cnn", "--num-classes=10",
                              f"--data-dir={data_dir}", "--img-size=32", "--epochs=1", *FT]) == 0
    ckpt = load_checkpoint(work / "result" / "weights_finetuned.pt")
    assert ckpt["classes"][:2] == ["class_0", "class_1"] and ckpt["preprocessing"]["img_size"] == 32


def test_no_better_epoch_keeps_the_starting_weights_and_says_so(work, capsys):
    base = weights(work / "model" / "mnist_cnn3.pt")
    assert finetune_gpu.main(["--model-path=model/mnist_cnn3.pt", "--lr=1e-12", "--freeze-bn", "--epochs=6",
                              "--patience=2", "--min-delta=0.01", *FT]) == 0
    out = capsys.readouterr().out
    assert "early stopping: val loss has not gone below" in out
    assert [int(r["epoch"]) for r in rows(work / "result" / "metrics.csv")] == [1, 2]
    last = out.strip().splitlines()[-1]
    assert "no epoch beat the starting model" in last and "holds the starting weights" in last
    kept = weights(work / "result" / "mnist_cnn3_finetuned.pt")
    for key, value in base.items():
        assert torch.equal(kept[key], value), key


def test_defaults_follow_the_guide(work):
    parser = finetune_gpu.build_parser()
    args, _, source = resolve_args(parser, ["--model-path=model/mnist_cnn3.pt"])
    assert (args.optimizer, args.lr, args.batch_size, args.epochs) == ("adamw", 1e-3, 256, 30)
    assert args.scheduler == "cosine" and args.early_stopping_patience == 15
    assert args.output == "./result" and args.log_dir == "./logs_finetune"
    assert args.data_dir == source.config["data_dir"]  # the data the model was trained on


def _segmentation_checkpoint(path: Path) -> Path:
    model, spec = build_model("unet", 2, base=4)
    torch.save(make_payload(model, task="segmentation", model_spec=spec, meta={"mask_values": [0, 255]},
                            metrics={}, config={}), path)
    return path


@pytest.mark.parametrize("case", ["segmentation", "freeze_until_unknown", "nothing_to_train",
                                  "classes_differ", "not_a_checkpoint", "missing_file", "patience_negative",
                                  "lr_negative", "data_dir_missing"])
def test_bad_input_is_one_line_and_writes_nothing(work, capsys, case):
    other = work / "three"
    make_folder(other, classes=("a", "b", "c"), per_class=6, seed=3)
    (work / "notes.pt").write_text("not a model")
    argv, expected = {
        "segmentation": ([f"--model-path={_segmentation_checkpoint(work / 'unet.pth')}"],
                         "is a segmentation checkpoint; finetune_gpu.py fine-tunes image classifiers "
                         "(continue a U-Net with train_unet.py -f/--load)"),
        "freeze_until_unknown": (["--model-path=model/mnist_cnn3.pt", "--freeze-until=feature.9"],
                                 "--freeze-until 'feature.9' names no module of SmallCNN"),
        "nothing_to_train": (["--model-path=model/mnist_cnn3.pt", "--freeze-until=head"],
                             "leaves no parameter to train"),
        "classes_differ": (["--model-path=model/mnist_cnn3.pt", f"--data-dir={other}"],
                           "differ from the model's (class_0, class_1"),
        "not_a_checkpoint": (["--model-path=notes.pt"], "is not a PyTorch file"),
        "missing_file": (["--model-path=result/mnist_cnn_finetuned.pt"], "does not exist"),
        "patience_negative": (["--model-path=model/mnist_cnn3.pt", "--patience=-1"],
                              "--patience must be 0 (off) or more"),
        "lr_negative": (["--model-path=model/mnist_cnn3.pt", "--lr=-1"], "--lr must be positive"),
        "data_dir_missing": (["--model-path=model/mnist_cnn3.pt", "--data-dir=NOPE"],
                             "data folder NOPE does not exist; check --data-dir"),
    }[case]
    assert finetune_gpu.main([*argv, *FT]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err, err
    assert not (work / "result").exists() and not (work / "logs_finetune").exists()


def test_class_mismatch_message_names_a_flag_that_works(work, capsys):
    other = work / "three"
    make_folder(other, classes=("a", "b", "c"), per_class=6, seed=3)
    assert finetune_gpu.main(["--model-path=model/mnist_cnn3.pt", f"--data-dir={other}", *FT]) == 2
    assert "pass --num-classes 3" in capsys.readouterr().err
    assert finetune_gpu.main(["--model-path=model/mnist_cnn3.pt", f"--data-dir={other}", "--num-classes=3",
                              "--epochs=1", *FT]) == 0


def test_under_torchrun_two_processes(work):
    from test_distributed import torchrun

    root = Path(__file__).resolve().parents[1]
    result = torchrun(root / "finetune_gpu.py", f"--model-path={work / 'model' / 'mnist_cnn3.pt'}",
                      "--epochs=1", f"--output={work / 'ddp'}", f"--log-dir={work / 'tb'}", *FT,
                      "--no-gpu")  # 2 CPU processes on gloo, also where a GPU is visible
    assert result.returncode == 0, result.stderr[-3000:]
    log = (work / "ddp" / "training.log").read_text()
    assert "2 processes on gloo" in log and "before fine-tuning" in log
    ckpt = load_checkpoint(work / "ddp" / "checkpoint.pth")
    assert ckpt["train_state"]["step"] == 8  # 240 images: 8 steps of 2 x 16 (padded shares)
    assert (work / "ddp" / "mnist_cnn3_finetuned.pt").is_file()


def test_guide_base_model_on_fashionmnist(tmp_path, monkeypatch, capsys):
    """The README's recipe for the guide's mnist_cnn3.pt (gpu_train.py on Fashion-MNIST), then the
    guide's fine-tuning command with no data flags: the data and preprocessing come from the model."""
    from conftest import make_fake_mnist

    monkeypatch.chdir(tmp_path)
    make_fake_mnist(tmp_path / "data")
    assert gpu_train.main(["--dataset", "fashionmnist", "--data-dir", "./data", "--model", "small_cnn",
                           "--batch-size", "32", "--epochs", "1", "--lr", "0.01", "--num-workers", "0",
                           "--output", "./output"]) == 0
    (tmp_path / "model").mkdir()
    shutil.copy(tmp_path / "output" / "best_model.pth", tmp_path / "model" / "mnist_cnn3.pt")
    capsys.readouterr()
    assert finetune_gpu.main(["--model-path=model/mnist_cnn3.pt", "--batch-size=32", "--lr=0.001",
                              "--epochs=2", "--scheduler=cosine", "--num-workers=0"]) == 0
    out = capsys.readouterr().out
    assert "data: fashionmnist in data: 200 train / 50 val images, 10 classes" in out
    ckpt = load_checkpoint(tmp_path / "result" / "mnist_cnn3_finetuned.pt")
    assert ckpt["preprocessing"]["img_size"] == 28
    assert ckpt["preprocessing"]["mean"][0] == pytest.approx(0.286)
    assert ckpt["classes"][0] == "T-shirt/top"


def test_same_classes_in_another_order_reorder_the_head():
    from argparse import Namespace
    from types import SimpleNamespace

    from common.finetune import Source, fit_classes

    model, spec = build_model("small_cnn", 3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model.eval()(x)
    source = Source(Path("m.pth"), model, spec, ["a", "b", "c"], {}, {})
    notes: list[str] = []
    kept = fit_classes(source, SimpleNamespace(classes=["c", "a", "b"]),
                       Namespace(data_dir="d", num_classes=None), notes.append)
    with torch.no_grad():
        after = model(x)
    assert torch.allclose(after, before[:, [2, 0, 1]]) and kept["kwargs"]["num_classes"] == 3
    assert "reordered" in notes[0]


def test_early_stopping_state_survives_the_checkpoint():
    from common.engine import TrainState

    state = TrainState(epoch=4, best_metric=0.5, best_epoch=3, stop_best=0.25, stop_epoch=2)
    again = TrainState.from_dict(state.to_dict())
    assert (again.stop_best, again.stop_epoch) == (0.25, 2)
    assert again.stop_improved(0.3, 0.0) is False and again.stop_improved(0.2, 0.0) is True
    assert again.stop_epoch == 4


def test_curves_show_the_model_before_training(tmp_path, monkeypatch):
    import matplotlib.axes

    from common.reporting import plot_curves

    drawn = []
    original = matplotlib.axes.Axes.axhline
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline",
                        lambda self, y, **kw: drawn.append((y, kw.get("label"))) or original(self, y, **kw))
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "train_acc": 0.5, "val_acc": 0.6, "lr": 1e-3}]
    plot_curves(history, tmp_path / "c.png", {"val_loss": 1.2, "val_acc": 0.4})
    assert drawn == [(1.2, "val before training"), (pytest.approx(40.0), "val before training")]  # acc in %
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_patience_0_switches_early_stopping_off(work):
    assert finetune_gpu.main(["--model-path=model/mnist_cnn3.pt", "--lr=1e-12", "--freeze-bn", "--epochs=3",
                              "--patience=0", "--min-delta=0.01", *FT]) == 0
    assert [int(r["epoch"]) for r in rows(work / "result" / "metrics.csv")] == [1, 2, 3]


def test_plain_state_dict_without_img_size_says_which_size_it_assumes(work, tmp_path, capsys):
    plain = tmp_path / "weights.pth"
    torch.save(weights(work / "model" / "mnist_cnn3.pt"), plain)
    small = make_ten_class(tmp_path / "small", per_class=3, seed=5)  # 224x224 is slow: few images
    assert finetune_gpu.main([f"--model-path={plain}", "--arch=small_cnn", "--num-classes=10",
                              f"--data-dir={small}", "--val-split=0.34", "--epochs=1", *FT]) == 0
    out = capsys.readouterr().out
    assert "records no preprocessing; using 224x224" in out and "Pass --img-size N" in out
    assert "preprocessing: 224x224" in out


def test_checkpoints_are_readable_like_other_files(work):
    import os
    import stat

    assert finetune_gpu.main(["--model-path=model/mnist_cnn3.pt", "--epochs=1", *FT]) == 0
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("mnist_cnn3_finetuned.pt", "checkpoint.pth"):
        mode = stat.S_IMODE((work / "result" / name).stat().st_mode)
        assert mode == 0o666 & ~mask, (name, oct(mode))


def test_whole_pickled_model_needs_trust_and_arch(work, tmp_path, capsys):
    from common.models import model_from_spec

    ckpt = load_checkpoint(work / "model" / "mnist_cnn3.pt")
    model = model_from_spec(ckpt["model"])
    model.load_state_dict(ckpt["state_dict"])
    pickled = tmp_path / "whole.pt"
    torch.save(model, pickled)
    data = [f"--data-dir={ckpt['config']['data_dir']}", "--img-size=32"]
    assert finetune_gpu.main([f"--model-path={pickled}", *data, *FT]) == 2
    assert "--trust-checkpoint" in capsys.readouterr().err
    assert finetune_gpu.main([f"--model-path={pickled}", "--trust-checkpoint", *data, *FT]) == 2
    assert "pass --arch NAME" in capsys.readouterr().err
    assert finetune_gpu.main([f"--model-path={pickled}", "--trust-checkpoint", "--arch=small_cnn", *data,
                              "--epochs=1", *FT]) == 0
    rebuilt = load_checkpoint(work / "result" / "whole_finetuned.pt")  # safe to load: plain types only
    assert rebuilt["model"]["name"] == "small_cnn" and rebuilt["lineage"][0]["file"] == "whole.pt"


def test_light_augmentation_is_the_eval_pipeline_plus_a_small_rotation():
    from argparse import Namespace

    from torchvision import transforms as T

    from common.finetune import _preparation

    pre = {"img_size": 32, "resize_size": 37, "mean": [0.5] * 3, "std": [0.25] * 3, "channels": 3}
    prep = _preparation(Namespace(img_size=None, augment=False, no_hflip=False), pre)
    steps = prep.train_transform(prep.pre).transforms
    names = [type(t).__name__ for t in steps]
    assert names == ["ToRGB", "Resize", "CenterCrop", "RandomRotation", "ToTensor", "Normalize"]
    assert steps[3].degrees == [-10.0, 10.0]
    recipe = _preparation(Namespace(img_size=48, augment=True, no_hflip=False), pre)
    assert recipe.pre["img_size"] == 48 and recipe.pre["resize_size"] == round(48 / (32 / 37))
    assert any(isinstance(t, T.RandomResizedCrop) for t in recipe.train_transform(recipe.pre).transforms)
