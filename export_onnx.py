"""Export a trained checkpoint to ONNX, then check the file against PyTorch in onnxruntime.

    python export_onnx.py --model ./output/best_model.pth --output model.onnx
    python export_onnx.py --model ./output/best_model.pth --output model.onnx --opset 17 --static-batch
    python export_onnx.py --model ./output/best_model.pth --img-size 288 --atol 1e-3
    python export_onnx.py --model weights.pth --arch resnet18 --num-classes 10 --output resnet18.onnx

Model, classes and preprocessing come from the checkpoint. The graph has one input "input"
(float32, N x C x H x W, normalised as in validation) and one output "logits"; the batch axis
is dynamic unless --static-batch. Class names, mean/std, input size, task and model go into
the file's metadata (metadata_props), so a consumer needs no other file. After exporting, the
file is checked: onnx.checker, then onnxruntime (CPU) against PyTorch on the same random
inputs at batch 1 and 4; a difference above --atol is an error and the file is not written.
Opset 18 and newer use torch's torch.export-based exporter; older opsets (e.g. 11, 17 for
older runtimes) use torch's TorchScript-based exporter. The work is in common/export.py.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from common.cli import add_loading_args, new_parser, resolve
from common.errors import run_cli
from common.export import DEFAULT_OPSET, DYNAMO_MIN_OPSET


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(__doc__)
    parser.add_argument("--model", required=True, metavar="CHECKPOINT",
                        help="checkpoint to export (best_model.pth or checkpoint.pth)")
    parser.add_argument("--output", metavar="FILE.onnx",
                        help="the ONNX file to write (default: beside the checkpoint, with .onnx)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset version (default: {DEFAULT_OPSET}; below {DYNAMO_MIN_OPSET} "
                             "the TorchScript-based exporter is used)")
    parser.add_argument("--static-batch", action="store_true",
                        help="fix the batch axis at 1 (default: dynamic batch size)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input size for models that allow another one (default: the checkpoint's; "
                             "224 for a plain state_dict)")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest allowed |onnxruntime - PyTorch| difference (default: 1e-4)")
    parser.add_argument("--device", default="cpu",
                        help="device to trace the model on: cpu (default), cuda, cuda:N, mps or auto")
    parser.add_argument("--verbose", action="store_true", help="show the exporter's own output")
    add_loading_args(parser, plain_state_dict=True)
    return parser


def _main(argv: Sequence[str] | None) -> int:
    args, _ = resolve(build_parser(), argv)  # --help and a bad flag answer before torch loads
    from common.export import export_checkpoint

    return export_checkpoint(args)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
