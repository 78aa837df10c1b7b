"""The flags of image classification (gpu_train.py, multi_gpu_train.py), kept free of torch so
that `--help` and a mistyped flag answer before the heavy libraries load."""
from __future__ import annotations

import argparse

from .cli import add_device_args, add_loading_args, add_runtime_args, add_training_args
from .data.builtin import TORCHVISION_SETS
from .recipes import add_recipe_arg

DEMO_PRESET = {"model": "small_cnn", "img_size": 64, "epochs": 12, "batch_size": 32, "lr": 3e-3,
               "weight_decay": 1e-4, "data_dir": "./demo_data", "output": "./demo_output",
               "warmup_epochs": 1.0}
AUGMENTATIONS = ("standard", "cifar", "none")
DATA_CACHE_MODES = ("auto", "off", "ram", "device")


def add_classification_args(parser: argparse.ArgumentParser) -> None:
    add_recipe_arg(parser)
    d = parser.add_argument_group("data")
    d.add_argument("--data-dir", default="./dataset",
                   help="folder with train/ and val/ class folders (default: ./dataset)")
    d.add_argument("--dataset", choices=["imagefolder", *TORCHVISION_SETS], default="imagefolder",
                   help="imagefolder (default) or a torchvision set read from --data-dir")
    d.add_argument("--download", action="store_true", help="download --dataset (needs internet)")
    d.add_argument("--val-split", type=float, default=0.2,
                   help="fraction of train/ held out when there is no val/ folder (default: 0.2)")
    d.add_argument("--img-size", type=int, default=224, help="input size in pixels (default: 224)")
    d.add_argument("--no-hflip", action="store_true",
                   help="no horizontal flips (for data where mirroring changes the class)")
    d.add_argument("--check-images", choices=["fast", "full", "off"], default="fast",
                   help="check every image before epoch 1 (default: fast)")
    d.add_argument("--skip-bad-images", action="store_true",
                   help="train without unreadable images (listed in bad_images.txt) instead of stopping")
    add_data_path_args(d)
    m = parser.add_argument_group("model")
    m.add_argument("--model", default="efficientnet_b0",
                   help="a timm or torchvision name (a bare name: timm first; timm/NAME or "
                        "torchvision/NAME to choose), or small_cnn (default: %(default)s)")
    m.add_argument("--num-classes", type=int, default=None,
                   help="number of classes (default: counted from the class folders)")
    m.add_argument("--pretrained", action="store_true",
                   help="start from the library's weights (needs network)")
    m.add_argument("--weights", metavar="PATH", help="start from weights in a local file")
    add_loading_args(m, plain_state_dict=False)  # for --weights and --resume
    m.add_argument("--list-models", action="store_true", help="list the model names and exit")
    o = parser.add_argument_group("output")
    o.add_argument("--output", default="./output", help="output folder (default: ./output)")
    o.add_argument("--demo", action="store_true",
                   help="write a small built-in two-class image set and train on it")
    o.add_argument("--demo-images", type=int, default=200,
                   help="images per class of the --demo set (default: 200)")
    o.add_argument("--test", action="store_true",
                   help="at the end, evaluate best_model.pth on the test split (torchvision sets: "
                        "their test set; folders: DATA_DIR/test/) and write test_metrics.json")
    add_training_args(parser, batch_size=32, epochs=50, lr=1e-3)
    add_regularisation_args(parser)
    add_device_args(parser)
    add_runtime_args(parser)
    add_distributed_args(parser)


def add_data_path_args(group) -> None:
    """How images reach the model: the augmentation and the decode-once cache."""
    group.add_argument("--augment", choices=AUGMENTATIONS, default="standard",
                       help="training augmentation: standard (random resized crop, flip, rotation 15, "
                            "colour jitter 0.2), cifar (random crop with 4 px padding, flip) or none")
    add_cache_args(group)


def add_cache_args(group) -> None:
    group.add_argument("--data-cache", choices=DATA_CACHE_MODES, default="auto",
                       help="decode the images once and keep them as uint8 tensors: on the GPU "
                            "(device), in RAM (ram), or not (off: read the files every epoch); auto "
                            "picks by size (default: auto)")
    group.add_argument("--cache-dir", metavar="DIR", default=None,
                       help="folder for the cache file (default: DATA_DIR/.toolkit_cache)")


def add_regularisation_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("regularisation")
    g.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA",
                   help="MixUp with Beta(ALPHA, ALPHA) mixing weights (default: 0, off)")
    g.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA",
                   help="CutMix with Beta(ALPHA, ALPHA) box areas (default: 0, off); with --mixup, "
                        "one of the two per batch")
    g.add_argument("--mix-prob", type=float, default=1.0, metavar="P",
                   help="share of batches that --mixup/--cutmix change (default: 1)")
    g.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="keep an exponential moving average of the weights (e.g. 0.999); it is "
                        "evaluated each epoch and saved as the best model when it is better")


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """Settings that matter under torchrun (harmless in a single process)."""
    g = parser.add_argument_group("distributed (under torchrun)")
    g.add_argument("--devices", default=None, metavar="LIST",
                   help="GPUs to train on: '0,1' (those GPUs), N (the first N) or auto (all); more than "
                        "one starts one DDP process per GPU through torch.distributed.run")
    g.add_argument("--sync-bn", action="store_true",
                   help="batch-norm statistics over all processes (SyncBatchNorm)")
    g.add_argument("--lr-scale", choices=["none", "linear"], default="none",
                   help="linear: multiply --lr by global batch / --base-batch-size (default: none)")
    g.add_argument("--base-batch-size", type=int, default=None,
                   help="batch size --lr was tuned for (default: --batch-size x accumulation, "
                        "so --lr-scale linear scales by the number of processes)")
    g.add_argument("--dist-timeout", type=float, default=1800.0,
                   help="seconds a process waits for the others before the job fails (1800)")
