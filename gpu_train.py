"""Train an image classifier on a folder of images (one GPU, a CPU, or under torchrun).

    python gpu_train.py --demo                      # built-in two-class set, about a minute on a CPU
    python gpu_train.py --data-dir ./dataset --model efficientnet_b0 --num-classes 2 \
        --batch-size 32 --epochs 50 --lr 0.001 --img-size 224 --output ./output --amp \
        --label-smoothing 0.1
    python gpu_train.py --resume ./output/checkpoint.pth --epochs 100
    python gpu_train.py --dataset cifar10 --data-dir ./data --download --model resnet18
    python gpu_train.py --list-models

./dataset holds train/<class>/*.jpg and val/<class>/*.jpg (without val/, --val-split of train/
is held out). Outputs in --output: checkpoint.pth (resume), best_model.pth, training.log,
metrics.csv, config.json, tensorboard/, curves.png.
"""
from __future__ import annotations

from collections.abc import Sequence

from common.classify import add_classification_args, resolve_args, train
from common.cli import new_parser
from common.errors import run_cli


def build_parser():
    parser = new_parser(__doc__.split("\n\n")[0])
    add_classification_args(parser)
    return parser


def _main(argv: Sequence[str] | None) -> int:
    args, ckpt = resolve_args(build_parser(), argv)
    return train(args, ckpt)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
