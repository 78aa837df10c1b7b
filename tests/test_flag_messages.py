"""A message that recommends a flag names one the script accepts.

Dynamically: every script is run on the model files that make its loader speak (a plain
state_dict, a whole pickled model, a truncated or random file, a missing one, a checkpoint
without training state) and on a few other cheap mistakes; every `--flag` in its `error:` lines
(test_model.py: its file-integrity line) must be in that script's parser ("other.py --flag"
is looked up in other.py's). Statically: every `--flag` in the text of a UserError anywhere in
common/ or the scripts exists in at least one script's parser. And the loading flags work:
--trust-checkpoint with gpu_train.py --weights and train_unet.py -f reads a whole pickled model.
"""
from __future__ import annotations

import ast
import importlib
import random
import re
from functools import cache
from pathlib import Path

import pytest
import torch
from conftest import FAST, make_folder

from common.checkpoint import atomic_save, make_payload
from common.data.images import preprocessing
from common.data.segmentation import make_shapes_dataset
from common.models import build_model
from common.models.small import SmallCNN

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("gpu_train", "multi_gpu_train", "finetune_gpu", "train_unet", "run_behavior_classification",
           "validate", "predict", "export_onnx", "test_model")
# an optional "script.py " before the flag: the flag is that script's
FLAG = re.compile(r"(?:\b(\w+)\.py )?(?<![\w-])(--[a-z][a-z0-9-]*)")
UNET = ["-e", "1", "-b", "2", "-s", "1", "--width", "4", "--num-workers", "0"]


@cache
def parser_flags(script: str) -> frozenset[str]:
    parser = importlib.import_module(script).build_parser()
    return frozenset(option for action in parser._actions for option in action.option_strings)


def flags_missing(script: str, text: str) -> list[str]:
    """The flags `text` names that do not exist where it says (its own script unless qualified)."""
    missing = []
    for other, flag in FLAG.findall(text):
        owner = other or script
        if owner not in SCRIPTS or flag not in parser_flags(owner):
            missing.append(f"{other + '.py ' if other else ''}{flag}")
    return missing


def test_the_check_itself_finds_a_flag_the_script_lacks():
    assert flags_missing("validate", "error: x; pass --arch NAME and --num-classes N") == []
    assert flags_missing("validate", "error: x; pass --weights FILE") == ["--weights"]
    assert flags_missing("validate", "error: see gpu_train.py --list-models") == []
    assert flags_missing("validate", "see gpu_train.py --no-such-flag") == ["gpu_train.py --no-such-flag"]
    assert flags_missing("train_unet", "pass it to -f/--load") == []


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flags")
    data = root / "data"
    make_folder(data / "train", per_class=4, seed=1)
    make_folder(data / "val", per_class=2, seed=2)
    torch.manual_seed(0)
    model = SmallCNN(2)
    ckpt = root / "best_model.pth"
    spec = {"name": "small_cnn", "source": "local", "kwargs": {"num_classes": 2}}
    atomic_save(make_payload(model, task="classification", model_spec=spec,
                             meta={"classes": ["bottom", "top"], "preprocessing": preprocessing(32)},
                             metrics={}, config={}), ckpt)
    torch.save(model.state_dict(), root / "weights.pth")
    torch.save(model, root / "whole.pt")
    unet, _ = build_model("unet", 2, base=4)
    torch.save(unet, root / "whole_unet.pt")
    data_bytes = ckpt.read_bytes()
    (root / "cut.pth").write_bytes(data_bytes[: len(data_bytes) // 2])
    (root / "random.pth").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(2048)))
    return {"root": root, "data": data, "val": data / "val", "ckpt": ckpt, "weights": root / "weights.pth",
            "whole": root / "whole.pt", "whole_unet": root / "whole_unet.pt", "cut": root / "cut.pth",
            "random": root / "random.pth", "missing": root / "nope.pth",
            "image": next((data / "val" / "top").iterdir()),
            "shapes": make_shapes_dataset(root / "shapes", n=6, size=32)}


BAD_FILES = ("weights", "whole", "cut", "random", "missing")


def invocations(script: str, f: dict[str, Path]) -> list[tuple[list[str], int]]:
    """(argv, exit code) of cheap runs that end in a message."""
    out = str(f["root"] / f"out_{script}")
    if script == "validate":
        runs = [["--model", str(f[k]), "--data-dir", str(f["val"]), "--num-workers", "0"] for k in BAD_FILES]
        runs.append(["--model", str(f["ckpt"]), "--data-dir", str(f["root"] / "no_data")])
    elif script == "predict":
        runs = [["-m", str(f[k]), "-i", str(f["image"])] for k in BAD_FILES]
        runs.append(["-m", str(f["ckpt"]), "-i", str(f["image"]), "--topk", "0"])
    elif script == "export_onnx":
        runs = [["--model", str(f[k]), "--output", f"{out}.onnx"] for k in BAD_FILES]
        runs.append(["--model", str(f["ckpt"]), "--opset", "3"])
    elif script == "test_model":  # a bad model file fails check 1 (exit 1); a bad value or path is exit 2
        return [(["--model-path", str(f[k]), "--batch-size", "2"], 2 if k == "missing" else 1)
                for k in BAD_FILES] + \
            [(["--model-path", str(f["ckpt"]), "--arch", "no_such_net"], 2),
             (["--model-path", str(f["ckpt"]), "--batches", "0"], 2)]
    elif script == "finetune_gpu":
        common = ["--data-dir", str(f["data"]), "--output", out, "--num-workers", "0", "--epochs", "1"]
        runs = [["--model-path", str(f[k]), *common] for k in BAD_FILES]
        runs += [["--model-path", str(f["whole"]), "--trust-checkpoint", *common],
                 ["--resume", str(f["weights"])], []]
    elif script in ("gpu_train", "multi_gpu_train"):
        runs = [["--resume", str(f[k])] for k in (*BAD_FILES, "ckpt")]
        runs += [["--weights", str(f[k]), "--data-dir", str(f["data"]), "--output", out, *FAST, "--epochs",
                  "1"] for k in ("whole", "random")]
        runs.append(["--lr", "nan", "--data-dir", str(f["data"]), "--output", out])
    elif script == "train_unet":
        runs = [["--resume", str(f[k])] for k in (*BAD_FILES, "ckpt")]
        runs += [["-f", str(f["whole_unet"]), "--data-dir", str(f["shapes"]), "--output", out, *UNET],
                 ["-s", "2", "--data-dir", str(f["shapes"]), "--output", out]]
    else:  # run_behavior_classification.py loads no model file
        runs = [["--resume", str(f["ckpt"])], ["--data-dir", str(f["root"] / "no_data"), "--epochs", "1"]]
    return [(argv, 2) for argv in runs]


# What the loading messages must recommend in each script (so the check above is not vacuous).
RECOMMENDED = {
    "validate": {"--arch", "--num-classes", "--trust-checkpoint"},
    "predict": {"--arch", "--num-classes", "--trust-checkpoint"},
    "export_onnx": {"--arch", "--num-classes", "--trust-checkpoint"},
    "test_model": {"--arch", "--num-classes", "--trust-checkpoint"},
    "finetune_gpu": {"--arch", "--num-classes", "--trust-checkpoint", "--model-path"},
    "gpu_train": {"--trust-checkpoint", "--weights"},
    "multi_gpu_train": {"--trust-checkpoint", "--weights"},
    "train_unet": {"--trust-checkpoint", "--load"},
    "run_behavior_classification": {"--resume"},
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_in_a_message_exists_in_that_script(script, files, capsys):
    main = importlib.import_module(script).main
    messages = []
    for argv, code in invocations(script, files):
        capsys.readouterr()
        assert main(argv) == code, (argv, capsys.readouterr())
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err, captured.err
        lines = [line for line in captured.err.splitlines() if line.startswith("error: ")]
        if code == 1:  # test_model.py reports a bad file in its check 1
            lines = [line for line in captured.out.splitlines() if " 1. file integrity: " in line]
        assert len(lines) == 1, (argv, captured)
        messages += lines
    for line in messages:
        assert flags_missing(script, line) == [], f"{script}.py: {line}"
    named = {flag for line in messages for flag in FLAG.findall(line) if not flag[0]}
    assert RECOMMENDED[script] <= {flag for _, flag in named}, messages


def user_error_texts(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string (and f-string part) inside a UserError(...) call."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        name = getattr(node.func, "id", getattr(node.func, "attr", "")) if isinstance(node, ast.Call) else ""
        if name == "UserError":
            found += [(n.lineno, n.value) for n in ast.walk(node)
                      if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return found


def test_every_flag_in_any_user_error_exists_in_some_script():
    every = frozenset().union(*(parser_flags(s) for s in SCRIPTS))
    sources = sorted((ROOT / "common").rglob("*.py")) + [ROOT / f"{s}.py" for s in SCRIPTS]
    checked, unknown = 0, []
    for path in sources:
        for line, text in user_error_texts(path):
            for other, flag in FLAG.findall(text):
                checked += 1
                owner_flags = parser_flags(other) if other in SCRIPTS else every
                if flag not in owner_flags:
                    where = f"{path.relative_to(ROOT)}:{line}"
                    unknown.append(f"{where}: {other + '.py ' if other else ''}{flag}")
    assert checked > 50  # the scan reads the messages (a broken scan would pass vacuously)
    assert unknown == []


# ---------------------------------------------------------------- the loading flags work

def test_gpu_train_weights_of_a_trusted_whole_model(files, capsys):
    import gpu_train

    out = files["root"] / "trusted"
    capsys.readouterr()
    assert gpu_train.main(["--weights", str(files["whole"]), "--trust-checkpoint", "--data-dir",
                           str(files["data"]), "--output", str(out), *FAST, "--epochs", "1"]) == 0
    total = len(SmallCNN(2).state_dict())
    assert f"weights: loaded {total}/{total} tensors from {files['whole']}" in capsys.readouterr().out


def test_train_unet_load_of_a_trusted_whole_model(files, capsys):
    import train_unet

    capsys.readouterr()
    assert train_unet.main(["-f", str(files["whole_unet"]), "--trust-checkpoint", "--data-dir",
                            str(files["shapes"]), "--output", str(files["root"] / "unet"), *UNET]) == 0
    total = len(build_model("unet", 2, base=4)[0].state_dict())
    assert f"weights: loaded {total}/{total} tensors from {files['whole_unet']}" in capsys.readouterr().out
