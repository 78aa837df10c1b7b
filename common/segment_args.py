"""The flags of segmentation training (train_unet.py), kept free of torch so that `--help` and a
mistyped flag answer before the heavy libraries load."""
from __future__ import annotations

import argparse

from .classify_args import add_cache_args
from .cli import add_device_args, add_loading_args, add_runtime_args, add_training_args


def add_segmentation_args(parser: argparse.ArgumentParser) -> None:
    d = parser.add_argument_group("data")
    d.add_argument("--data-dir", default="data/", help="folder with imgs/ and masks/ (default: data/)")
    d.add_argument("-s", "--scale", type=float, default=0.5, help="downscaling factor of the images (0.5)")
    d.add_argument("-v", "--validation", type=float, default=10.0,
                   help="percent of the pairs used for validation (default: 10.0)")
    d.add_argument("-c", "--classes", type=int, default=2, help="number of classes (default: 2)")
    d.add_argument("--check-images", choices=["fast", "full", "off"], default="fast",
                   help="check every image and mask before epoch 1 (default: fast)")
    d.add_argument("--demo", action="store_true",
                   help="write a generated set of ellipses and rectangles to --data-dir and train on it")
    add_cache_args(d)
    m = parser.add_argument_group("model")
    m.add_argument("--bilinear", action="store_true", help="bilinear upsampling (default: transposed conv)")
    m.add_argument("--width", type=int, default=64, help="channels of the first U-Net block (default: 64)")
    m.add_argument("-f", "--load", metavar="PATH",
                   help="start a new run (epoch 1) from weights: a checkpoint of this toolkit or a "
                        "Pytorch-UNet .pth; to continue a run use --resume")
    add_loading_args(m, plain_state_dict=False)  # for -f/--load and --resume
    o = parser.add_argument_group("output")
    o.add_argument("--output", default="checkpoints/", help="output folder (default: checkpoints/)")
    o.add_argument("--keep-last", type=int, default=3,
                   help="checkpoint_epoch{N}.pth files (weights only, as best_model.pth) to keep: the last K "
                        "and the best epoch's (default: 3; 0 keeps all)")
    add_training_args(parser, batch_size=1, epochs=5, lr=1e-5, short_flags=True)
    parser.set_defaults(early_stopping_patience=10, min_delta=0.001, weight_decay=1e-8)
    add_device_args(parser)
    add_runtime_args(parser)
