"""Train an image classifier on a folder of images (one GPU, a CPU, or under torchrun).

    python gpu_train.py --demo                      # built-in two-class set, about a minute on a CPU
    python gpu_train.py --data-dir ./dataset --model efficientnet_b0 --num-classes 2 \
        --batch-size 32 --epochs 50 --lr 0.001 --img-size 224 --output ./output --amp \
        --label-smoothing 0.1
    python gpu_train.py --resume ./output/checkpoint.pth --epochs 100
    python gpu_train.py --dataset cifar10 --data-dir ./data --download --model resnet18
    python gpu_train.py --recipe cifar10 --dataset cifar10 --data-dir ./data --download
    python gpu_train.py --recipe cifar10 --dataset cifar10 --data-dir ./data --devices 0,1
    python gpu_train.py --list-models

./dataset holds train/<class>/*.jpg and val/<class>/*.jpg (without val/, --val-split of train/
is held out). Outputs in --output: checkpoint.pth (resume), best_model.pth, training.log,
metrics.csv, config.json, tensorboard/, curves.png.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from common.classify_args import add_classification_args
from common.cli import new_parser, parse_early
from common.errors import run_cli


def build_parser():
    parser = new_parser(__doc__)
    add_classification_args(parser)
    return parser


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    parse_early(parser, argv)  # --help and a bad flag answer before torch loads
    from common.classify import resolve_args, train
    from common.launch import launch_devices

    args, ckpt = resolve_args(parser, argv)
    code = launch_devices(__file__, args, argv)  # --devices 0,1: one DDP process per GPU
    return train(args, ckpt) if code is None else code


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
