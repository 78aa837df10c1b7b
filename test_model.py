"""Check a saved model before fine-tuning: file integrity, device, forward pass, quick evaluation
and memory (step one of the fine-tuning guide).

    python test_model.py --model-path ./output/best_model.pth
    python test_model.py --model-path=./output/best_model.pth --data-dir ./dataset/val
    python test_model.py --model ./output/best_model.pth --data-dir ./dataset/val --batches 3 --batch-size 32
    python test_model.py --model-path weights.pth --arch resnet18 --num-classes 10 --img-size 224
    python test_model.py --model-path whole_model.pt --trust-checkpoint --img-size 224
    python test_model.py --model-path ./output/best_model.pth --no-gpu

One line per check, marked passed, failed or skipped (emoji, or [PASS] / [FAIL] / [SKIP] where the
console cannot show them, e.g. a Windows cp936 console), details indented below it:
  1. file integrity: readable, format and version, sha256, parameter count, the weights fit the
     architecture (names the keys that do not), no NaN/Inf in the weights (names the tensors)
  2. device: the GPU (name, memory, CUDA and cuDNN versions), or a CPU-only run (not a failure)
  3. forward pass: a random batch of the checkpoint's input shape gives finite (batch, classes) scores
  4. quick evaluation: accuracy and loss on --batches batches of a random sample of --data-dir
     (class folders named as the checkpoint's classes; skipped without --data-dir)
  5. memory: peak GPU memory of the forward pass, or the process's peak RSS on a CPU
A check that cannot run because an earlier one failed is shown as skipped.

Files made elsewhere: a plain state_dict needs --arch NAME --num-classes N (and --img-size, default
224); a whole pickled model is read only with --trust-checkpoint, since unpickling it can run code.
Such files carry no class names: with --data-dir, the class folders in sorted order are labels
0..N-1, as torchvision's ImageFolder numbers them.

The checks are in common/selftest.py.

Exit codes: 0 every check passed; 1 a check failed (the model file, the data or the device);
2 the command line is wrong (argparse usage errors, bad values such as --batches 0, --device foo,
--gpu-id beyond the visible GPUs, an unknown --arch, a --model-path that does not exist or is a
folder): one error line, and no check runs.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from common.cli import add_device_args, add_loading_args, new_parser, resolve
from common.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(__doc__)
    parser.add_argument("--model-path", "--model", dest="model_path", metavar="FILE",
                        help="the model file: best_model.pth / checkpoint.pth, or a file made elsewhere")
    parser.add_argument("--data-dir", help="folder of class folders for the quick evaluation (optional)")
    parser.add_argument("--batches", type=int, default=3, help="batches of the quick evaluation (default: 3)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="batch size of the forward pass and the evaluation (default: 32)")
    add_loading_args(parser, plain_state_dict=True, img_size=224)
    add_device_args(parser)
    return parser


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args, given = resolve(parser, argv)
    if not args.model_path:
        parser.error("the following arguments are required: --model-path (or --model)")
    # --help, a bad flag and a missing --model-path are answered above, before torch loads
    from common.selftest import prepare, run_checks

    return run_checks(prepare(args, given))


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
