"""Train an image classifier on several GPUs (or CPU processes) with DistributedDataParallel.

    torchrun --nproc_per_node 4 multi_gpu_train.py --distributed --data-dir ./dataset \
        --batch-size 64 --epochs 50 --amp
    python multi_gpu_train.py --distributed --batch-size 64 --epochs 50 --amp   # launches itself
    python multi_gpu_train.py --distributed --nproc-per-node 2 --demo           # 2 CPU processes
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        multi_gpu_train.py --distributed --data-dir /shared/dataset --output /shared/output

Every gpu_train.py flag works here. --batch-size is per process; the log states the global
batch. Without torchrun, --distributed starts torch.distributed.run itself over every visible
GPU (--nproc-per-node N to choose; N CPU processes on gloo where there is no GPU); with one
GPU it runs as one process. --max-restarts K restarts failed workers, which resume from the
last checkpoint.pth by themselves.
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
    g = parser.add_argument_group("launching")
    g.add_argument("--distributed", action="store_true",
                   help="train with DDP; without torchrun, launch one process per GPU")
    g.add_argument("--nproc-per-node", type=int, default=None,
                   help="processes to launch without torchrun (default: the visible GPUs)")
    g.add_argument("--max-restarts", type=int, default=0,
                   help="restart failed workers up to K times; they resume from checkpoint.pth")
    return parser


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    parse_early(parser, argv)  # --help and a bad flag answer before torch loads
    from common.classify import resolve_args, train
    from common.launch import launch_devices, processes_to_launch, relaunch, under_torchrun

    args, ckpt = resolve_args(parser, argv)
    if args.devices is not None:  # the CIFAR notes' --devices 0,1
        code = launch_devices(__file__, args, argv)
        return train(args, ckpt) if code is None else code
    if args.distributed and not under_torchrun() and not args.list_models:
        nproc = processes_to_launch(args.nproc_per_node, args.no_gpu)
        if nproc > 1:
            return relaunch(__file__, nproc, args.max_restarts, argv, args.no_gpu)
        print("one device: training in this single process (pass --nproc-per-node N for N "
              "processes)", flush=True)
    return train(args, ckpt)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
