"""Train a U-Net for image segmentation on data/imgs + data/masks.

    python train_unet.py --demo    # generated shapes: val Dice ~0.94 in ~40 s on 2 CPU cores
    python train_unet.py -e 50 -b 1 -l 1e-4 --amp -s 0.25 --bilinear --accumulate-grad-batches 8
    python train_unet.py -e 80 -b 4 -l 1e-4 --amp -s 0.5 --accumulate-grad-batches 2
    python train_unet.py --resume checkpoints/checkpoint.pth -e 100

Images and masks pair by file stem (a mask may carry a suffix such as _mask). Mask values
(0/1, 0/255, palettes, class indices) are found across the set and stored in the checkpoint.
Outputs in --output (default checkpoints/): checkpoint.pth (the one resume state, for --resume),
checkpoint_epoch{N}.pth (weights only, like best_model.pth: the last --keep-last 3 and the best
epoch's), best_model.pth (best val Dice), training.log, metrics.csv, tensorboard/, curves.png,
val_samples.png (image | true mask | predicted). -f/--load starts a new run from a file's weights
(this toolkit's checkpoints or Pytorch-UNet's .pth); --resume continues a run. -s must leave the
smallest image 16 px per side (four poolings); -b 1 works at any such size. On a CUDA
out-of-memory error training turns on gradient checkpointing, then halves the micro-batch, and goes on.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from common.cli import new_parser, parse_early
from common.errors import run_cli
from common.segment_args import add_segmentation_args


def build_parser():
    parser = new_parser(__doc__)
    add_segmentation_args(parser)
    return parser


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    parse_early(parser, argv)  # --help and a bad flag answer before torch loads
    from common.segment import resolve_args, train

    args, ckpt = resolve_args(parser, argv)
    return train(args, ckpt)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
