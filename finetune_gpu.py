"""Fine-tune a saved image classifier: small learning rate, optional freezing, early stopping.

    python finetune_gpu.py --model-path=model/mnist_cnn3.pt --batch-size=256 --lr=0.001 \
        --epochs=30 --scheduler=cosine
    python finetune_gpu.py --model-path=result/mnist_cnn3_finetuned.pt --batch-size=256 \
        --lr=0.0005 --epochs=20 --scheduler=cosine                        # a second, gentler round
    python finetune_gpu.py --model-path=model/mnist_cnn3.pt --epochs=50 --freeze-conv  # head only
    python finetune_gpu.py --model-path ./output/best_model.pth --data-dir ./new_data --num-classes 5
    python finetune_gpu.py --resume result/checkpoint.pth --epochs 40
    tensorboard --logdir=logs_finetune

The data is the one the model was trained on (as its checkpoint records it) unless --data-dir /
--dataset say otherwise; the preprocessing is the model's. Outputs: --output (default ./result)
gets MODEL_finetuned.pt (the best model: it starts as the loaded model and is replaced only by a
better epoch), checkpoint.pth (resume), training.log, metrics.csv, config.json, curves.png;
TensorBoard goes to --log-dir (default ./logs_finetune), one sub-folder per run.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from common.cli import new_parser, parse_early
from common.errors import run_cli
from common.finetune_args import add_finetune_args


def build_parser():
    parser = new_parser(__doc__)
    add_finetune_args(parser)
    return parser


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    parse_early(parser, argv)  # --help and a bad flag answer before torch loads
    from common.finetune import resolve_args, train

    args, ckpt, source = resolve_args(parser, argv)
    return train(args, ckpt, source)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
