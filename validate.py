"""Evaluate a saved model: a classifier on class folders, or a U-Net on imgs/ + masks/.

    python validate.py --model ./output/best_model.pth --data-dir ./dataset/test
    python validate.py --model ./output/best_model.pth --data-dir ./dataset/val \
        --results-file results.json --output-dir ./report
    python validate.py --model checkpoints/best_model.pth --data-dir data/   # Dice and IoU
    python validate.py --model weights.pth --arch resnet18 --num-classes 10 --data-dir ./dataset/test
    python validate.py --model checkpoints/best_model.pth --data-dir data/ --files checkpoints/val_files.txt

Model, classes and preprocessing come from the checkpoint. Prints loss, top-1 (top-5 with more
than 5 classes) and per-class precision/recall/F1; writes confusion_matrix.png (in validation/
beside the checkpoint unless --output-dir is given) and, with --results-file, the same numbers as JSON.
A plain state_dict made elsewhere needs --arch and --num-classes (and --img-size, default 224);
such a file has no class names, so the class folders in sorted order are labels 0..N-1.
A run that split its validation images off the training folder lists them in val_files.txt;
--files evaluates those only (the whole folder would include the images the model trained on).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from common.cli import add_device_args, add_loading_args, check_positive, new_parser, resolve
from common.errors import run_cli
from common.series_args import add_series_args


def build_parser():
    parser = new_parser(__doc__)
    parser.add_argument("--model", required=True, metavar="CHECKPOINT",
                        help="checkpoint to evaluate (best_model.pth or checkpoint.pth)")
    parser.add_argument("--data-dir", required=True, help="folder of class folders to evaluate on")
    parser.add_argument("--files", metavar="LIST.txt",
                        help="evaluate only the images this file lists (one per line, relative to "
                             "--data-dir): a run's val_files.txt, the images it held out")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    parser.add_argument("--results-file", metavar="FILE.json", help="also write the results as JSON")
    parser.add_argument("--output-dir",
                        help="where confusion_matrix.png goes (default: validation/ beside the model)")
    parser.add_argument("--check-images", choices=["fast", "full", "off"], default="fast",
                        help="check every image first (default: fast)")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="evaluate without unreadable images instead of stopping")
    parser.add_argument("-s", "--scale", type=float, default=None,
                        help="U-Net models: the image scale (default: the checkpoint's; 0.5 for a "
                             "Pytorch-UNet file, which records none)")
    add_loading_args(parser, plain_state_dict=True, img_size=None)
    add_device_args(parser)
    add_series_args(parser)
    return parser


def _main(argv: Sequence[str] | None) -> int:
    args, _ = resolve(build_parser(), argv)  # --help and a bad flag answer before torch loads
    check_positive(args, "batch_size")
    if not Path(args.data_dir).exists():  # before the model loads: say which folder, and what is there
        from common.data.images import missing_folder_error

        raise missing_folder_error(Path(args.data_dir), typed=args.data_dir)
    from common.inference import load_from_args
    from common.session import start_session
    from common.validation import report, report_folder, validate_classification, validate_segmentation

    if args.results_file:
        from common.outdir import prepare_output_file

        prepare_output_file(args.results_file, "--results-file")
    args.report_dir = report_folder(args)
    s = start_session(args, None)
    loaded = load_from_args(args.model, args, s.device, log=s.log)
    if loaded.task == "segmentation":
        return validate_segmentation(loaded, args, s)
    if loaded.task == "timeseries":
        from common.series_tools import validate_recordings

        return validate_recordings(loaded, args, s, report)
    return validate_classification(loaded, args, s)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
