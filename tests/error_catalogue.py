"""The catalogue of bad inputs the tools recognise, and the line each one gets.

Each case makes its bad input in a scratch folder, runs the script's main(argv) there, in this
process, and keeps the `error:` line. docs/errors.md is written from these runs:

    python tests/error_catalogue.py            # rewrite docs/errors.md
    python tests/error_catalogue.py --check    # exit 1 if docs/errors.md is out of date

tests/test_error_catalogue.py runs every case (exit code 2, exactly one `error:` line, no
traceback, the expected words) and checks that docs/errors.md is what the cases print, so the
document cannot drift from the code.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (str(ROOT), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)
os.environ.setdefault("MPLBACKEND", "Agg")

from conftest import FAST, make_folder  # noqa: E402

DOC = ROOT / "docs" / "errors.md"
UNET_FAST = ["-s", "1", "--width", "8", "--num-workers", "0", "--log-interval", "2"]


@dataclass(frozen=True)
class Case:
    area: str
    title: str
    script: str  # the module of the script, e.g. "gpu_train"
    make: Callable[[Assets], list[str]]  # makes the bad input in the current folder, returns argv
    expect: str  # words the error line must hold (that the intended check answered)


class Assets:
    """Inputs the cases share, made once (a trained checkpoint takes seconds) and copied into
    each case's folder."""

    def __init__(self, store: Path):
        self.store = store
        self._made: dict[str, Path] = {}

    def _once(self, name: str, build: Callable[[Path], None]) -> Path:
        if name not in self._made:
            target = self.store / name
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                build(target)
            self._made[name] = target
        return self._made[name]

    def copy(self, name: str, build: Callable[[Path], None], to: str) -> str:
        source = self._once(name, build)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, to)
        return to

    def images(self, to: str = "dataset") -> str:
        def build(root: Path) -> None:
            make_folder(root / "train", per_class=6, seed=1)
            make_folder(root / "val", per_class=3, seed=2)
        return self.copy("images", build, to)

    def classifier(self, to: str = "best_model.pth", which: str = "best_model.pth") -> str:
        def build(out: Path) -> None:
            import gpu_train

            data = self._once("images_for_training", lambda r: (make_folder(r / "train", per_class=6, seed=1),
                                                                 make_folder(r / "val", per_class=3, seed=2)))
            with inside(self.store):  # relative paths: the bytes do not depend on the scratch folder
                assert gpu_train.main(["--data-dir", data.name, "--output", out.name, *FAST, "--epochs", "1",
                                       "--data-cache", "off"]) == 0
        return shutil.copy(self._once("classifier", build) / which, to) and to

    def shapes(self, to: str = "data") -> str:
        def build(root: Path) -> None:
            from common.data.segmentation import make_shapes_dataset

            make_shapes_dataset(root, n=8, size=32)
        return self.copy("shapes", build, to)

    def unet(self, to: str = "unet.pth", which: str = "best_model.pth") -> str:
        def build(out: Path) -> None:
            import train_unet

            data = self._once("shapes_for_training", lambda r: self._shapes(r))
            assert train_unet.main(["--data-dir", str(data), "--output", str(out), "-e", "1", "-b", "4",
                                    "-v", "25", *UNET_FAST]) == 0
        return shutil.copy(self._once("unet", build) / which, to) and to

    @staticmethod
    def _shapes(root: Path) -> None:
        from common.data.segmentation import make_shapes_dataset

        make_shapes_dataset(root, n=8, size=32)


def write(path: str, data: bytes | str) -> str:
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    (file.write_bytes if isinstance(data, bytes) else file.write_text)(data)
    return path


def folder(name: str) -> str:
    os.makedirs(name, exist_ok=True)
    return name


def recordings(root: str, first: list[str] | None = None, header: str = "acc_x,acc_y,acc_z") -> str:
    """root/<class>/rec_<i>.csv for two classes; `first` replaces the first row of the first file."""
    import math

    for k, name in enumerate(("walk", "sit")):
        for i in range(4):
            lines = [",".join(f"{(k + 1) * math.sin(0.1 * (k + 1) * t + j):.4f}" for j in range(3))
                     for t in range(48)]
            if first is not None and k == 0 and i == 0:
                lines[0] = ",".join(first)
            write(f"{root}/{name}/rec_{i}.csv", header + "\n" + "\n".join(lines) + "\n")
    return root


def train(*argv: str) -> Callable[[Assets], list[str]]:
    """A gpu_train case on the shared image folder with quick flags, plus `argv`."""
    return lambda a: ["--data-dir", a.images(), "--output", "out", *FAST, "--epochs", "1", *argv]


def unet_checkpoint(a: Assets) -> str:
    """A U-Net run's resume state (width 8) with its data beside it."""
    a.shapes()
    return a.unet("checkpoint.pth", which="checkpoint.pth")


def truncated(a: Assets, fraction: float, name: str = "checkpoint.pth") -> str:
    path = a.classifier(name, which="checkpoint.pth")
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * fraction)])
    return path


def flipped(a: Assets) -> str:
    path = Path(a.classifier("checkpoint.pth", which="checkpoint.pth"))
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)  # the local header's
    data[info.header_offset + 30 + name_len + extra_len + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return str(path)


def pickled_module(path: str) -> str:
    import torch

    torch.save(torch.nn.Linear(2, 2), path)
    return path


def state_dict_only(path: str) -> str:
    import torch

    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    return path


def locked_output(a: Assets) -> list[str]:
    # the lock of a live process of this machine (this one's parent: a run started before this one)
    write("out/.toolkit.lock", json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    return train()(a)


def one_class(a: Assets) -> list[str]:
    make_folder(Path("one/train"), classes=("top",), per_class=3)
    make_folder(Path("one/val"), classes=("top",), per_class=2)
    return ["--data-dir", "one", "--output", "out", *FAST, "--epochs", "1"]


def corrupt_image(a: Assets) -> list[str]:
    data = a.images()
    write(f"{data}/train/top/broken.png", b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    return ["--data-dir", data, "--output", "out", *FAST, "--epochs", "1"]


def checksummed_corrupt_png(a: Assets) -> list[str]:
    """A PNG whose chunk checksums are right but whose compressed pixels are not."""
    from test_bad_images import write_corrupt_png

    data = a.images()
    write_corrupt_png(Path(f"{data}/train/top/damaged.png"), "flipped")
    return ["--data-dir", data, "--output", "out", *FAST, "--epochs", "1"]


def missing_mask(a: Assets) -> list[str]:
    data = Path(a.shapes())
    next(iter(sorted((data / "masks").iterdir()))).unlink()
    return ["--data-dir", str(data), "--output", "out", "-e", "1", *UNET_FAST]


def bad_mask_value(a: Assets) -> list[str]:
    from PIL import Image

    data = Path(a.shapes())
    masks = sorted((data / "masks").iterdir())
    Image.new("L", Image.open(masks[0]).size, 77).save(masks[0])
    for m in masks[1:]:
        Image.open(m).point(lambda v: 255 if v else 0).save(m)
    return ["--data-dir", str(data), "--output", "out", "-e", "1", *UNET_FAST]


def hand_edited(a: Assets, change: Callable[[dict], None]) -> str:
    import torch

    path = a.classifier("edited.pth")
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)
    return path


CLASSIFY = "training an image classifier (gpu_train.py, multi_gpu_train.py)"
FLAGS = "flags and config files (every training script)"
FILES = "checkpoint files (every tool that reads one)"
OUTPUT = "output folders"
FINETUNE = "fine-tuning (finetune_gpu.py)"
UNET = "U-Net segmentation (train_unet.py)"
TOOLS = "evaluating, predicting, exporting (validate.py, predict.py, export_onnx.py, test_model.py)"
SERIES = "behaviour recordings (run_behavior_classification.py)"

CASES: list[Case] = [
    # ---------------------------------------------------------------- classification data
    Case(CLASSIFY, "data folder does not exist", "gpu_train",
         lambda a: ["--data-dir", "missing", "--output", "out", *FAST], "does not exist"),
    Case(CLASSIFY, "data folder without class folders", "gpu_train",
         lambda a: ["--data-dir", folder("empty"), "--output", "out", *FAST],
         "empty"),
    Case(CLASSIFY, "only one class", "gpu_train", one_class, "only one class"),
    Case(CLASSIFY, "--num-classes differs from the folders", "gpu_train", train("--num-classes", "5"),
         "--num-classes 5"),
    Case(CLASSIFY, "an unreadable image", "gpu_train", corrupt_image, "broken.png"),
    Case(CLASSIFY, "a PNG with valid checksums but corrupt pixel data", "gpu_train", checksummed_corrupt_png,
         "damaged.png"),
    Case(CLASSIFY, "--img-size below 8", "gpu_train", train("--img-size", "4"), "--img-size"),
    Case(CLASSIFY, "--img-size too large for the memory", "gpu_train", train("--img-size", "100000"),
         "cannot fit"),
    Case(CLASSIFY, "unknown --model", "gpu_train", train("--model", "resnet_9000"), "resnet_9000"),
    Case(CLASSIFY, "unknown --recipe", "gpu_train", train("--recipe", "imagenet22k"), "imagenet22k"),
    Case(CLASSIFY, "--devices names a GPU twice", "gpu_train", train("--devices", "0,0"), "--devices"),
    Case(CLASSIFY, "--devices not a number or list", "gpu_train", train("--devices", "two"), "--devices"),
    Case(CLASSIFY, "--nproc-per-node 0", "multi_gpu_train",
         lambda a: ["--distributed", "--nproc-per-node", "0", "--data-dir", a.images(), "--output", "out"],
         "--nproc-per-node"),
    Case(CLASSIFY, "--weights file does not exist", "gpu_train", train("--weights", "nowhere.pth"),
         "nowhere.pth"),
    Case(CLASSIFY, "torchvision data set not downloaded", "gpu_train",
         lambda a: ["--dataset", "cifar10", "--data-dir", "cifar", "--output", "out", *FAST], "--download"),
    # ---------------------------------------------------------------- flags and config
    Case(FLAGS, "--lr nan", "gpu_train", train("--lr", "nan"), "--lr"),
    Case(FLAGS, "--lr 0", "gpu_train", train("--lr", "0"), "--lr"),
    Case(FLAGS, "--label-smoothing 1", "gpu_train", train("--label-smoothing", "1"), "--label-smoothing"),
    Case(FLAGS, "--weight-decay below 0", "gpu_train", train("--weight-decay", "-0.1"), "--weight-decay"),
    Case(FLAGS, "--clip-grad below 0", "gpu_train", train("--clip-grad", "-1"), "--clip-grad"),
    Case(FLAGS, "--momentum above 1", "gpu_train", train("--momentum", "1.5"), "--momentum"),
    Case(FLAGS, "--warmup-epochs below 0", "gpu_train", train("--warmup-epochs", "-2"), "--warmup-epochs"),
    Case(FLAGS, "--mixup below 0", "gpu_train", train("--mixup", "-1"), "--mixup"),
    Case(FLAGS, "--ema 1", "gpu_train", train("--ema", "1"), "--ema"),
    Case(FLAGS, "--nan-max-skips below 0", "gpu_train",
         train("--nan-policy", "skip", "--nan-max-skips", "-1"), "--nan-max-skips"),
    Case(FLAGS, "--batch-size 0", "gpu_train", train("--batch-size", "0"), "--batch-size"),
    Case(FLAGS, "--epochs 0", "gpu_train", train("--epochs", "0"), "--epochs"),
    Case(FLAGS, "--device that does not exist", "gpu_train", train("--device", "tpu"), "--device"),
    Case(FLAGS, "--device cuda:-1", "gpu_train", train("--device", "cuda:-1"), "cuda:N"),
    Case(FLAGS, "--gpu-id below 0", "gpu_train", train("--gpu-id", "-1"), "--gpu-id"),
    Case(FLAGS, "--gpu-memory-fraction above 1", "gpu_train", train("--gpu-memory-fraction", "2"),
         "--gpu-memory-fraction"),
    Case(FLAGS, "--config file does not exist", "gpu_train", train("--config", "nowhere.json"),
         "nowhere.json"),
    Case(FLAGS, "--config file is not JSON", "gpu_train",
         lambda a: train("--config", write("c.json", "{lr: 0.1"))(a), "not valid JSON"),
    Case(FLAGS, "--config file holds a list", "gpu_train",
         lambda a: train("--config", write("c.json", "[1, 2]"))(a), "JSON object"),
    Case(FLAGS, "--resume with another --model", "gpu_train",
         lambda a: ["--resume", a.classifier("checkpoint.pth", which="checkpoint.pth"), "--epochs", "5",
                    "--model", "resnet18"], "contradicts"),
    Case(FLAGS, "--val-split outside (0, 1), also beside a val/ folder", "gpu_train",
         train("--val-split", "1.5"), "--val-split"),
    Case(FLAGS, "--config file with an unknown key", "gpu_train",
         lambda a: train("--config", write("c.json", '{"learning_rat": 0.1}'))(a), "learning_rat"),
    Case(FLAGS, "--config value of the wrong type", "gpu_train",
         lambda a: train("--config", write("c.json", '{"epochs": "many"}'))(a), "epochs"),
    Case(FLAGS, "--config value outside the choices", "gpu_train",
         lambda a: train("--config", write("c.json", '{"optimizer": "lion"}'))(a), "optimizer"),
    Case(FLAGS, "--config file that switches on unpickling", "gpu_train",
         lambda a: train("--config", write("c.json", '{"trust_checkpoint": true}'))(a), "--trust-checkpoint"),
    # ---------------------------------------------------------------- checkpoints
    Case(FILES, "--resume file does not exist", "gpu_train", train("--resume", "nowhere/checkpoint.pth"),
         "does not exist"),
    Case(FILES, "--resume of a folder", "gpu_train", lambda a: train("--resume", folder("ck"))(a), "folder"),
    Case(FILES, "an empty checkpoint", "gpu_train", lambda a: train("--resume", write("e.pth", b""))(a),
         "empty"),
    Case(FILES, "a file that is not a checkpoint", "gpu_train",
         lambda a: train("--resume", write("notes.pth", "my notes"))(a), "not a PyTorch file"),
    Case(FILES, "a truncated checkpoint", "gpu_train", lambda a: train("--resume", truncated(a, 0.5))(a),
         "truncated"),
    Case(FILES, "a checkpoint with flipped bits", "gpu_train", lambda a: train("--resume", flipped(a))(a),
         "checksum"),
    Case(FILES, "a pickled model without --trust-checkpoint", "validate",
         lambda a: ["--model", pickled_module("whole.pth"), "--data-dir", a.images("d") + "/val"],
         "--trust-checkpoint"),
    Case(FILES, "--resume of best_model.pth (no training state)", "gpu_train",
         lambda a: train("--resume", a.classifier())(a), "best_model.pth"),
    Case(FILES, "--resume of a U-Net checkpoint in gpu_train.py", "gpu_train",
         lambda a: train("--resume", a.unet())(a), "segmentation"),
    Case(FILES, "a segmentation checkpoint in a classification-only tool", "finetune_gpu",
         lambda a: ["--model-path", a.unet(), "--data-dir", a.images(), "--output", "out"], "segmentation"),
    Case(FILES, "a checkpoint from a newer format", "validate",
         lambda a: ["--model", hand_edited(a, lambda c: c.update(version=99)), "--data-dir",
                    a.images("d") + "/val"], "version"),
    Case(FILES, "a hand-edited checkpoint without its model spec", "validate",
         lambda a: ["--model", hand_edited(a, lambda c: c.pop("model")), "--data-dir",
                    a.images("d") + "/val"],
         "model"),
    Case(FILES, "a hand-edited checkpoint with an unknown constructor argument", "validate",
         lambda a: ["--model", hand_edited(a, lambda c: c["model"]["kwargs"].update(depth=9)), "--data-dir",
                    a.images("d") + "/val"], "depth"),
    Case(FILES, "a hand-edited checkpoint without its input size", "predict",
         lambda a: ["--model", hand_edited(a, lambda c: c["preprocessing"].pop("img_size")), "--input",
                    a.images("d") + "/val"], "img_size"),
    Case(FILES, "a hand-edited checkpoint whose classes are not a list", "export_onnx",
         lambda a: ["--model", hand_edited(a, lambda c: c.update(classes="cat,dog")), "--output", "m.onnx"],
         "classes"),
    # ---------------------------------------------------------------- output folders
    Case(OUTPUT, "--output is a file", "gpu_train", lambda a: ["--data-dir", a.images(), "--output",
                                                               write("out.txt", "x"), *FAST], "out.txt"),
    Case(OUTPUT, "--output under a file", "gpu_train", lambda a: ["--data-dir", a.images(), "--output",
                                                                  write("f", "x") + "/out", *FAST], "f"),
    Case(OUTPUT, "--output in use by another run", "gpu_train", locked_output, "in use"),
    # ---------------------------------------------------------------- fine-tuning
    Case(FINETUNE, "--model-path does not exist", "finetune_gpu",
         lambda a: ["--model-path", "nowhere.pth", "--data-dir", a.images(), "--output", "out"],
         "nowhere.pth"),
    Case(FINETUNE, "a plain state_dict without --arch", "finetune_gpu",
         lambda a: ["--model-path", state_dict_only("sd.pth"), "--data-dir", a.images(), "--output", "out"],
         "--arch"),
    Case(FINETUNE, "--freeze-until a module the model lacks", "finetune_gpu",
         lambda a: ["--model-path", a.classifier(), "--data-dir", a.images(), "--output", "out",
                    "--freeze-until", "layer9", "--num-workers", "0"], "layer9"),
    # ---------------------------------------------------------------- U-Net
    Case(UNET, "no imgs/ and masks/ in --data-dir", "train_unet",
         lambda a: ["--data-dir", folder("nothing"), "--output", "out",
                    *UNET_FAST], "imgs"),
    Case(UNET, "an image without its mask", "train_unet", missing_mask, "mask"),
    Case(UNET, "a mask with a value the others lack", "train_unet", bad_mask_value, "77"),
    Case(UNET, "-s outside (0, 1]", "train_unet",
         lambda a: ["--data-dir", a.shapes(), "--output", "out", *UNET_FAST, "-s", "1.5"], "-s"),
    Case(UNET, "-v outside 0-100", "train_unet",
         lambda a: ["--data-dir", a.shapes(), "--output", "out", *UNET_FAST, "-v", "150"], "-v"),
    Case(UNET, "--resume with another --width", "train_unet",
         lambda a: ["--resume", unet_checkpoint(a), "-e", "5", "--width", "16"], "contradicts"),
    Case(UNET, "--width 0", "train_unet",
         lambda a: ["--data-dir", a.shapes(), "--output", "out", *UNET_FAST, "--width", "0"], "--width"),
    Case(UNET, "-f/--load of a classification checkpoint", "train_unet",
         lambda a: ["--data-dir", a.shapes(), "--output", "out", *UNET_FAST, "-f", a.classifier()],
         "is a classification checkpoint"),
    # ---------------------------------------------------------------- tools
    Case(TOOLS, "validate.py: --model does not exist", "validate",
         lambda a: ["--model", "nowhere.pth", "--data-dir", a.images()], "nowhere.pth"),
    Case(TOOLS, "validate.py: --data-dir does not exist", "validate",
         lambda a: ["--model", a.classifier(), "--data-dir", "missing"], "missing"),
    Case(TOOLS, "validate.py: class folders differ from the model's", "validate",
         lambda a: ["--model", a.classifier(), "--data-dir",
                    str(make_folder(Path("other"), classes=("cat", "dog"), per_class=2))], "cat"),
    Case(TOOLS, "validate.py: a plain state_dict without --arch", "validate",
         lambda a: ["--model", state_dict_only("sd.pth"), "--data-dir", a.images("d") + "/val"], "--arch"),
    Case(TOOLS, "validate.py: --output-dir is a file", "validate",
         lambda a: ["--model", a.classifier(), "--data-dir", a.images() + "/val", "--output-dir",
                    write("report", "x")], "report"),
    Case(TOOLS, "validate.py: --results-file is a folder", "validate",
         lambda a: ["--model", a.classifier(), "--data-dir", a.images() + "/val", "--results-file",
                    folder("results")], "results"),
    Case(TOOLS, "validate.py: --batch-size 0", "validate",
         lambda a: ["--model", a.classifier(), "--data-dir", a.images() + "/val", "--batch-size", "0"],
         "--batch-size"),
    Case(TOOLS, "validate.py: --files does not exist", "validate",
         lambda a: ["--model", a.classifier(), "--data-dir", a.images() + "/val", "--files",
                    "val_files.txt"], "val_files.txt"),
    Case(TOOLS, "validate.py: --files lists images the folder lacks", "validate",
         lambda a: ["--model", a.classifier(), "--data-dir", a.images() + "/val", "--files",
                    write("list.txt", "# data-dir: dataset/train\ntop/top_000.png\ntop/missing.png\n")],
         "--data-dir dataset/train"),
    Case(TOOLS, "predict.py: --input does not exist", "predict",
         lambda a: ["--model", a.classifier(), "--input", "photo.jpg"], "photo.jpg"),
    Case(TOOLS, "predict.py: a folder without images", "predict",
         lambda a: ["--model", a.classifier(), "--input", folder("pics")],
         "pics"),
    Case(TOOLS, "predict.py: a pattern that matches nothing", "predict",
         lambda a: ["--model", a.classifier(), "--input", "shots/*.png"], "shots/*.png"),
    Case(TOOLS, "predict.py: every input unreadable", "predict",
         lambda a: ["--model", a.classifier(), "--input", write("bad.png", b"\x89PNG\r\n\x1a\nnope")],
         "bad.png"),
    Case(TOOLS, "predict.py: --output of an unknown kind", "predict",
         lambda a: ["--model", a.classifier(), "--input", a.images() + "/val", "--output", "r.xlsx"],
         ".xlsx"),
    Case(TOOLS, "predict.py: a U-Net mask named as a non-image file", "predict",
         lambda a: ["--model", a.unet(), "--input", a.shapes() + "/imgs/shape_0000.png", "-o", "out.csv"],
         "out.csv"),
    Case(TOOLS, "predict.py: -t outside 0-1", "predict",
         lambda a: ["--model", a.unet(), "--input", a.shapes() + "/imgs/shape_0000.png", "-t", "1.5"],
         "-t/--mask-threshold"),
    Case(TOOLS, "predict.py: --output under a file", "predict",
         lambda a: ["--model", a.classifier(), "--input", a.images() + "/val", "--output",
                    write("notes", "x") + "/p.csv"], "notes is a file"),
    Case(TOOLS, "predict.py: a U-Net with every input unreadable", "predict",
         lambda a: ["--model", a.unet(), "--input", write("scan.png", b"\x89PNG\r\n\x1a\nnope")], "scan.png"),
    Case(TOOLS, "export_onnx.py: --opset too old", "export_onnx",
         lambda a: ["--model", a.classifier(), "--output", "m.onnx", "--opset", "5"], "--opset"),
    Case(TOOLS, "export_onnx.py: --output in a folder that is a file", "export_onnx",
         lambda a: ["--model", a.classifier(), "--output", write("f", "x") + "/m.onnx"], "f"),
    Case(TOOLS, "test_model.py: --model-path does not exist", "test_model",
         lambda a: ["--model-path", "nowhere.pth"], "nowhere.pth"),
    Case(TOOLS, "test_model.py: --model-path is a folder", "test_model",
         lambda a: ["--model-path", folder("models")], "folder"),
    Case(TOOLS, "test_model.py: --batches 0", "test_model",
         lambda a: ["--model-path", a.classifier(), "--batches", "0"], "--batches"),
    # ---------------------------------------------------------------- behaviour recordings
    Case(SERIES, "--data-dir does not exist", "run_behavior_classification",
         lambda a: ["--data-dir", "missing", "--output", "out", "--num-workers=0"], "missing"),
    Case(SERIES, "a folder without recordings", "run_behavior_classification",
         lambda a: ["--data-dir", folder("nothing"), "--output", "out",
                    "--num-workers=0"], "nothing"),
    Case(SERIES, "a cell that is not a number", "run_behavior_classification",
         lambda a: ["--data-dir", recordings("rec", first=["0.1", "oops", "0.3"]), "--output", "out",
                    "--num-workers=0", "--channels", "acc_x,acc_y,acc_z"], "oops"),
    Case(SERIES, "an empty cell without --fill-missing", "run_behavior_classification",
         lambda a: ["--data-dir", recordings("rec", first=["0.1", "", "0.3"]), "--output", "out",
                    "--num-workers=0"], "--fill-missing"),
    Case(SERIES, "--channels names a missing column", "run_behavior_classification",
         lambda a: ["--data-dir", recordings("rec"), "--output", "out", "--num-workers=0",
                    "--channels", "gyro_x"], "gyro_x"),
]


@dataclass
class Outcome:
    case: Case
    argv: list[str]
    code: int | None
    errors: list[str]
    stderr: str


@contextlib.contextmanager
def inside(folder: Path):
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def run_case(case: Case, folder: Path, assets: Assets) -> Outcome:
    """Make the case's input in `folder` and run its script there; what it printed on stderr."""
    folder.mkdir(parents=True, exist_ok=True)
    err = io.StringIO()
    with inside(folder):
        argv = case.make(assets)
        module = importlib.import_module(case.script)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            try:
                code = module.main(list(argv))
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else 1
            except Exception:  # a bug: recorded as the traceback the user would see
                code = None
                traceback.print_exc(file=err)
    text = err.getvalue()
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    return Outcome(case, list(argv), code, errors, text)


def problems(outcome: Outcome) -> list[str]:
    """What is wrong with a case's outcome ([] when it is the promised one line and exit code 2)."""
    found = []
    if outcome.code != 2:
        found.append(f"exit code {outcome.code}, expected 2")
    if len(outcome.errors) != 1:
        found.append(f"{len(outcome.errors)} error lines, expected 1")
    if "Traceback" in outcome.stderr:
        found.append("a traceback")
    if outcome.errors and outcome.case.expect not in outcome.errors[0]:
        found.append(f"the line lacks {outcome.case.expect!r}")
    return found


def shown(text: str, folder: Path) -> str:
    """A line as a user in that folder would read it: scratch paths made relative, and what differs
    between machines (the process id and host of a lock) written as placeholders."""
    for prefix in (str(folder.resolve()), str(folder)):
        text = text.replace(prefix + os.sep, "").replace(prefix, ".")
    return re.sub(r"\(pid \d+ on [^)]+\)", "(pid PID on HOST)", text)


def command(outcome: Outcome, folder: Path) -> str:
    """The command as the user would type it, without the quick-test flags the cases add."""
    argv = list(outcome.argv)
    for quick in (FAST, UNET_FAST):
        for i in range(len(argv) - len(quick) + 1):
            if argv[i:i + len(quick)] == quick:
                del argv[i:i + len(quick)]
                break
    args = " ".join(a if a and " " not in a and "*" not in a else repr(a) for a in argv)
    return shown(f"python {outcome.case.script}.py {args}", folder)


@contextlib.contextmanager
def fixed_memory(bytes_available: int = 16 * 10**9):
    """The memory check sees the same 16 GB on every machine, so its lines are the same everywhere."""
    from common import preflight

    real = preflight.memory_budget
    preflight.memory_budget = lambda device: (bytes_available, "of available RAM")
    try:
        yield
    finally:
        preflight.memory_budget = real


def run_all(scratch: Path) -> list[tuple[Outcome, Path]]:
    assets = Assets(scratch / "_assets")
    results = []
    with fixed_memory():
        for i, case in enumerate(CASES):
            folder = scratch / f"case{i:03d}"
            results.append((run_case(case, folder, assets), folder))
    return results


def render(results: list[tuple[Outcome, Path]]) -> str:
    lines = ["# Bad inputs and what the tools say", "",
             "Every bad input below is refused with one line on stderr and exit code 2; nothing the "
             "user had is changed. The list is generated from `tests/error_catalogue.py`, which makes "
             "each input and runs the command (`python tests/error_catalogue.py` rewrites this file; "
             "the test suite fails when it is out of date). Paths are relative to the folder the "
             "command ran in; the quick-test flags the cases add (a tiny model, tiny images) are "
             "left out of the commands, and the memory check was given 16 GB.", "",
             f"{len(results)} entries.", ""]
    area = None
    for outcome, folder in results:
        if outcome.case.area != area:
            area = outcome.case.area
            lines += [f"## {area[0].upper()}{area[1:]}", ""]
        message = shown(outcome.errors[0], folder) if outcome.errors else "(no error line)"
        lines += [f"**{outcome.case.title}**", "", "```", command(outcome, folder), message, "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with docs/errors.md, write nothing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="errors-") as scratch:
        results = run_all(Path(scratch))
        bad = [(o.case.title, problems(o)) for o, _ in results if problems(o)]
        text = render(results)
    for title, found in bad:
        print(f"case {title!r}: {'; '.join(found)}", file=sys.stderr)
    if args.check:
        same = DOC.is_file() and DOC.read_text(encoding="utf-8") == text
        print("docs/errors.md is up to date" if same else "docs/errors.md is out of date")
        return 0 if same and not bad else 1
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC} ({len(results)} entries, {len(bad)} with problems)")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
