"""Evaluate a saved model: a classifier on class folders, or a U-Net on imgs/ + masks/.

    python validate.py --model ./output/best_model.pth --data-dir ./dataset/test
    python validate.py --model ./output/best_model.pth --data-dir ./dataset/val \
        --results-file results.json --output-dir ./report
    python validate.py --model checkpoints/best_model.pth --data-dir data/   # Dice and IoU
    python validate.py --model weights.pth --arch resnet18 --num-classes 10 --data-dir ./dataset/test

Model, classes and preprocessing come from the checkpoint. Prints loss, top-1 (top-5 with more
than 5 classes) and per-class precision/recall/F1; writes confusion_matrix.png (in validation/
beside the checkpoint unless --output-dir is given) and, with --results-file, the same numbers as JSON.
A plain state_dict made elsewhere needs --arch and --num-classes (and --img-size, default 224);
such a file has no class names, so the class folders in sorted order are labels 0..N-1.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from common.cli import add_device_args, add_loading_args, new_parser, resolve
from common.errors import UserError, run_cli
from common.series_args import add_series_args


def build_parser():
    parser = new_parser(__doc__)
    parser.add_argument("--model", required=True, metavar="CHECKPOINT",
                        help="checkpoint to evaluate (best_model.pth or checkpoint.pth)")
    parser.add_argument("--data-dir", required=True, help="folder of class folders to evaluate on")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    parser.add_argument("--results-file", metavar="FILE.json", help="also write the results as JSON")
    parser.add_argument("--output-dir",
                        help="where confusion_matrix.png goes (default: validation/ beside the model)")
    parser.add_argument("--check-images", choices=["fast", "full", "off"], default="fast",
                        help="check every image first (default: fast)")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="evaluate without unreadable images instead of stopping")
    add_loading_args(parser, plain_state_dict=True, img_size=None)
    add_device_args(parser)
    add_series_args(parser)
    return parser


def readable_samples(samples: list[tuple[str, int]], args) -> list[tuple[str, int]]:
    from common.data.images import check_images

    bad = check_images([p for p, _ in samples], args.check_images)
    if bad and not args.skip_bad_images:
        raise UserError(f"{len(bad)} unreadable image(s), e.g. {bad[0][0]}: {bad[0][1]}; remove them "
                        "or pass --skip-bad-images")
    dropped = {p for p, _ in bad}
    return [s for s in samples if s[0] not in dropped]


def report(metrics: dict, scores: dict, classes: Sequence[str], count: int, unit: str = "images") -> str:
    lines = [f"{unit}: {count}", f"loss: {metrics['loss']:.4f}",
             f"top-1 accuracy: {100 * metrics['acc']:.2f}%"]
    if "top5" in metrics:
        lines.append(f"top-5 accuracy: {100 * metrics['top5']:.2f}%")
    width = max(8, *(len(c) for c in classes))
    lines.append(f"{'class':<{width}}  precision  recall     f1  support")
    for i, name in enumerate(classes):
        lines.append(f"{name:<{width}}  {scores['precision'][i]:9.4f}  {scores['recall'][i]:6.4f}  "
                     f"{scores['f1'][i]:6.4f}  {scores['support'][i]:7d}")
    return "\n".join(lines)


def report_folder(args) -> Path:
    """Where the plots go: --output-dir, else a validation/ folder of our own beside the model (so
    no file the user keeps beside the checkpoint is replaced); created and checked before the work."""
    from common.outdir import prepare_output_file

    folder = Path(args.output_dir) if args.output_dir else Path(args.model).parent / "validation"
    if folder.is_file():
        raise UserError(f"--output-dir {folder} is a file; pass a folder for the plots")
    prepare_output_file(folder / "confusion_matrix.png", "--output-dir")
    return folder


def write_results_file(path: str, result: dict) -> None:
    from common.outdir import write_atomically

    text = json.dumps(result, indent=2) + "\n"
    write_atomically(path, lambda fh: fh.write(text), name=f"--results-file {path}")


def validate_segmentation(loaded, args, s) -> int:
    """Dice and IoU (per image, averaged) on data-dir/imgs + data-dir/masks, at the checkpoint's
    scale; mask values come from the checkpoint (an unknown value is an error naming the file)."""
    from common.data import segmentation as seg
    from common.data.loaders import make_loader
    from common.engine import evaluate
    from common.tasks import SegmentationTask

    pairs = seg.find_pairs(Path(args.data_dir))
    seg.check_pairs(pairs, args.check_images, show_progress=True)
    mask_values = loaded.mask_values
    if not mask_values:
        raise UserError(f"{args.model} has no mask values; use a checkpoint written by train_unet.py")
    dataset = seg.SegmentationDataset(pairs, mask_values, loaded.preprocessing.get("scale", 0.5))
    loader = make_loader(dataset, args.batch_size, train=False, num_workers=s.num_workers,
                         pin_memory=s.pin_memory)
    task = SegmentationTask(loaded.spec["kwargs"]["num_classes"])
    metrics = task.summarize(evaluate(loaded.model, task, loader, s.precision, s.device,
                                      show_progress=True))
    print(f"pairs: {len(pairs)}\nloss: {metrics['loss']:.4f}\nDice: {metrics['dice']:.4f}\n"
          f"IoU: {metrics['iou']:.4f}")
    if args.results_file:
        result = {"checkpoint": str(args.model), "data_dir": str(args.data_dir), "pairs": len(pairs),
                  "metrics": metrics, "mask_values": mask_values}
        write_results_file(args.results_file, result)
        print(f"results: {args.results_file}")
    return 0


def _main(argv: Sequence[str] | None) -> int:
    args, _ = resolve(build_parser(), argv)  # --help and a bad flag answer before torch loads
    if not Path(args.data_dir).exists():  # before the model loads: say which folder, and what is there
        from common.data.images import missing_folder_error

        raise missing_folder_error(Path(args.data_dir), typed=args.data_dir)
    import torch

    from common.data.images import ImageDataset, eval_transform
    from common.data.loaders import make_loader
    from common.engine import evaluate
    from common.inference import folder_samples, load_from_args, output_width
    from common.metrics import per_class_scores
    from common.reporting import plot_confusion_matrix
    from common.session import start_session
    from common.tasks import ClassificationTask

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
    classes, samples, notes = folder_samples(loaded, Path(args.data_dir), output_width(loaded, s.device))
    for note in notes:
        s.log(f"notice: {note}")
    samples = readable_samples(samples, args)
    loader = make_loader(ImageDataset(samples, eval_transform(loaded.preprocessing)), args.batch_size,
                         train=False, num_workers=s.num_workers, pin_memory=s.pin_memory)
    task = ClassificationTask(len(classes))
    predicted: list[torch.Tensor] = []  # argmax per batch, kept on the device until the end
    hook = loaded.model.register_forward_hook(lambda _m, _i, out: predicted.append(out.argmax(1)))
    try:
        totals = evaluate(loaded.model, task, loader, s.precision, s.device, show_progress=True)
    finally:
        hook.remove()
    metrics = task.summarize(totals)
    matrix = totals["confusion"].tolist()
    scores = per_class_scores(totals["confusion"])
    print(report(metrics, scores, classes, len(samples)))
    plot_confusion_matrix(matrix, classes, args.report_dir / "confusion_matrix.png")
    print(f"confusion matrix: {args.report_dir / 'confusion_matrix.png'}")
    if args.results_file:
        labels = torch.cat(predicted).tolist() if predicted else []
        per_image = [{"path": p, "true": classes[t], "predicted": classes[q]}
                     for (p, t), q in zip(samples, labels, strict=True)]
        result = {"checkpoint": str(args.model), "data_dir": str(args.data_dir), "images": len(samples),
                  "metrics": metrics, "classes": classes, "per_class": scores,
                  "confusion_matrix": matrix, "predictions": per_image}
        write_results_file(args.results_file, result)
        print(f"results: {args.results_file}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
