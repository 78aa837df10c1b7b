"""The flags of fine-tuning (finetune_gpu.py), kept free of torch so that `--help` and a mistyped
flag answer before the heavy libraries load."""
from __future__ import annotations

import argparse

from .classify_args import add_cache_args, add_distributed_args
from .cli import add_device_args, add_loading_args, add_runtime_args, add_training_args
from .data.builtin import TORCHVISION_SETS


def add_finetune_args(parser: argparse.ArgumentParser) -> None:
    m = parser.add_argument_group("the model to fine-tune")
    m.add_argument("--model-path", metavar="FILE",
                   help="best_model.pth, checkpoint.pth or a *_finetuned.pt of this toolkit, or a plain "
                        "state_dict with --arch/--num-classes")
    add_loading_args(m, plain_state_dict=True,
                     num_classes_help="a new classifier head with this many classes (data with other classes "
                                      "than the model's); for a plain state_dict: its number of classes")
    f = parser.add_argument_group("freezing")
    f.add_argument("--freeze-conv", action="store_true",
                   help="freeze every convolution: only the layers after the last one train")
    f.add_argument("--freeze-bn", action="store_true",
                   help="batch norm in eval mode: running statistics and affine parameters unchanged")
    f.add_argument("--freeze-until", metavar="MODULE",
                   help="freeze the parameters up to and including this module (e.g. features.1)")
    d = parser.add_argument_group("data (default: the data the model was trained on)")
    d.add_argument("--data-dir", default=None, help="folder of images, or of a torchvision set")
    d.add_argument("--dataset", choices=["imagefolder", *TORCHVISION_SETS], default=None,
                   help="imagefolder or a torchvision set (default: the model's)")
    d.add_argument("--download", action="store_true", help="download --dataset (needs internet)")
    d.add_argument("--val-split", type=float, default=0.2,
                   help="fraction of train/ held out when there is no val/ folder (default: the model's)")
    d.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    d.add_argument("--augment", action="store_true",
                   help="the training recipe's augmentation instead of the light one (rotation 10 degrees)")
    d.add_argument("--no-hflip", action="store_true", help="no horizontal flips with --augment")
    d.add_argument("--check-images", choices=["fast", "full", "off"], default="fast",
                   help="check every image before epoch 1 (default: fast)")
    d.add_argument("--skip-bad-images", action="store_true",
                   help="train without unreadable images instead of stopping")
    add_cache_args(d)
    o = parser.add_argument_group("output")
    o.add_argument("--output", default="./result",
                   help="folder of MODEL_finetuned.pt, checkpoint.pth, training.log (default: ./result)")
    o.add_argument("--log-dir", default="./logs_finetune",
                   help="TensorBoard folder, one sub-folder per run (default: ./logs_finetune)")
    add_training_args(parser, batch_size=256, epochs=30, lr=1e-3, patience=15)
    add_device_args(parser)
    add_runtime_args(parser)
    add_distributed_args(parser)
