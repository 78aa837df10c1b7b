"""Behaviour classification from sensor recordings: cnn, transformer and fusion models compared.

    python run_behavior_classification.py --full-pipeline                 # ./hyx_data -> ./behavior_results
    python run_behavior_classification.py --full-pipeline --gpu-id 0 --mixed-precision
    python run_behavior_classification.py --quick-start --batch-size 16  # a first try, few epochs
    python run_behavior_classification.py --test-gpu                      # the GPU environment report
    python run_behavior_classification.py --full-pipeline --config gpu_config.json
    python run_behavior_classification.py --full-pipeline --data-glob "./*_data" --models cnn fusion

Data (found automatically): one CSV per recording in <class>/ folders (or train/ val/ test/
split folders holding them); long CSV recordings with a label column (cut into windows); or an
.npz with X (N, T, C) and y. Outputs in --output: <model>/best_model.pth and checkpoint.pth,
<model>/confusion_matrix_test.png, report.md, results.json, splits.json, config.json, training.log.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from common.behavior_args import add_behavior_args
from common.cli import new_parser, parse_early
from common.errors import run_cli
from common.launch import processes_to_launch, relaunch, under_torchrun


def build_parser():
    parser = new_parser(__doc__)
    add_behavior_args(parser)
    return parser


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    parse_early(parser, argv)  # --help and a bad flag answer before torch loads
    from common.behavior import resolve_args, run

    args = resolve_args(parser, argv)
    if args.test_gpu:
        from common.envreport import report

        return report()
    if args.multi_gpu and not under_torchrun():
        nproc = processes_to_launch(None, args.no_gpu)
        if nproc > 1:
            return relaunch(__file__, nproc, 0, argv, args.no_gpu)
        print("multi_gpu: one device here, so training runs in this single process", flush=True)
    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
