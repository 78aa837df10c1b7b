"""Run a saved model on files: the top classes of images or CSV recordings, or masks.

    python predict.py --model ./output/best_model.pth --input photo.jpg
    python predict.py -m best_model.pth -i ./new_images "shots/*.png" --topk 3 --output results.csv
    python predict.py -m best_model.pth -i ./new_images --output results.json --amp
    python predict.py -m checkpoints/best_model.pth -i image1.jpg image2.jpg -o out1.png out2.png -v
    python predict.py -m behavior_results/cnn/best_model.pth -i recording.csv ./new_recordings -o out.csv

Classes and preprocessing come from the checkpoint, exactly as validate.py prepares images (for
a behaviour model: its channel columns, window length and normalisation; a long recording is
cut into windows and gets each window's classes and their mean).
A U-Net .pth of Pytorch-UNet (a state_dict with mask_values) runs too: its shape is read from the
tensors; pass -s with the scale it was trained at (default 0.5, that trainer's).
--input takes files, folders (searched recursively) and glob patterns. Files that cannot be
read are reported (in the console and in --output) and skipped, for masks as for classes; when
none can be read, the run ends with one error line and exit code 2.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.cli import add_device_args, add_loading_args, new_parser, resolve
from common.errors import UserError, run_cli
from common.series_args import add_series_args

if TYPE_CHECKING:
    from common.inference import LoadedModel


def build_parser():
    parser = new_parser(__doc__)
    parser.add_argument("-m", "--model", required=True, metavar="CHECKPOINT", help="checkpoint to run")
    parser.add_argument("-i", "--input", nargs="+", required=True, metavar="PATH",
                        help="image files, folders (recursive) or glob patterns")
    parser.add_argument("--topk", type=int, default=5, help="classes to show per image (default: 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    parser.add_argument("-o", "--output", nargs="+", metavar="FILE",
                        help="classification: FILE.csv or FILE.json of the predictions; "
                             "segmentation: one mask file per input (default <name>_OUT.png)")
    g = parser.add_argument_group("segmentation checkpoints (U-Net)")
    g.add_argument("-s", "--scale", type=float, default=None, help="image scale (default: the checkpoint's)")
    g.add_argument("-t", "--mask-threshold", type=float, default=0.5,
                   help="probability above which a pixel is foreground, one-class models (0.5)")
    g.add_argument("-v", "--viz", action="store_true", help="also write a coloured overlay beside each mask")
    g.add_argument("-n", "--no-save", action="store_true",
                   help="write no files (neither masks nor --viz overlays); print the results only")
    g.add_argument("-c", "--classes", type=int, default=None, help="accepted, read from the checkpoint")
    g.add_argument("--bilinear", action="store_true", help="accepted, read from the checkpoint")
    add_loading_args(parser, plain_state_dict=True, img_size=None)
    add_device_args(parser)
    add_series_args(parser)
    return parser


class ImageFiles:
    """(tensor, index, error) per file: an unreadable file gives an error string, not a crash.
    A map-style dataset (the DataLoader needs only __len__ and __getitem__): no torch base class,
    so that this module loads without torch."""

    def __init__(self, paths: Sequence[Path], pre: dict[str, Any]):
        import torch

        from common.data.images import DECODE_ERRORS, describe_error, eval_transform, load_rgb

        self.paths, self.transform, self.load = list(paths), eval_transform(pre), load_rgb
        self.errors, self.describe = DECODE_ERRORS, describe_error
        self.blank = torch.zeros(pre.get("channels", 3), pre["img_size"], pre["img_size"])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return self.transform(self.load(self.paths[index])), index, ""
        except self.errors as exc:
            return self.blank, index, self.describe(exc)


def predict(loaded: LoadedModel, paths: Sequence[Path], s, batch_size: int, topk: int
            ) -> list[dict[str, Any]]:
    """Top-k per file. Results stay on the device until the end: one host read in all."""
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(ImageFiles(paths, loaded.preprocessing), batch_size=batch_size,
                        num_workers=s.num_workers, pin_memory=s.pin_memory)
    tops, order, failures = [], [], {}
    with torch.inference_mode():
        for images, indices, errors in loader:
            with s.precision.autocast():
                logits = loaded.model(images.to(s.device, non_blocking=True))
            tops.append(logits.float().softmax(dim=1).topk(min(topk, logits.shape[1]), dim=1))
            order += indices.tolist()
            failures.update({i: e for i, e in zip(indices.tolist(), errors, strict=True) if e})
        probs = torch.cat([t.values for t in tops]).tolist() if tops else []
        labels = torch.cat([t.indices for t in tops]).tolist() if tops else []
    classes = loaded.classes or []
    results: list[dict[str, Any]] = []
    for index, row_p, row_c in zip(order, probs, labels, strict=True):
        error = failures.get(index, "")
        predictions = [] if error else [
            {"label": classes[c] if c < len(classes) else str(c), "index": c, "probability": p}
            for p, c in zip(row_p, row_c, strict=True)]
        results.append({"path": str(paths[index]), "error": error, "predictions": predictions})
    return results


def write_results(results: list[dict[str, Any]], path: Path) -> None:
    """CSV (one row per file: path, label/prob pairs, error) or JSON, by the file name."""
    from common.outdir import write_atomically

    topk = max((len(r["predictions"]) for r in results), default=0)
    if path.suffix.lower() == ".json":
        write_atomically(path, lambda fh: fh.write(json.dumps(results, indent=2) + "\n"))
        return
    header = ["path"] + [f"{kind}{k}" for k in range(1, topk + 1) for kind in ("label", "prob")] + ["error"]

    def rows(fh) -> None:
        writer = csv.writer(fh)
        writer.writerow(header)
        for r in results:
            cells = [x for p in r["predictions"] for x in (p["label"], f"{p['probability']:.6f}")]
            writer.writerow([r["path"], *cells, *[""] * (2 * topk - len(cells)), r["error"]])

    write_atomically(path, rows)


def _main(argv: Sequence[str] | None) -> int:
    args, given = resolve(build_parser(), argv)  # --help and a bad flag answer before torch loads
    if args.topk < 1 or args.batch_size < 1:
        raise UserError("--topk and --batch-size must be 1 or more")
    from common import segment_predict
    from common.inference import gather_inputs, load_from_args
    from common.session import start_session

    s = start_session(args, None)
    loaded = load_from_args(args.model, args, s.device, log=s.log)
    if loaded.task == "timeseries":
        from common import series_tools

        return series_tools.run_predict(loaded, args, s, _results_file(args.output))
    paths = gather_inputs(args.input)
    if loaded.task == "segmentation":
        return segment_predict.run(loaded, paths, args, s, given)
    output = _results_file(args.output)
    results = predict(loaded, paths, s, args.batch_size, args.topk)
    for r in results:
        shown = ", ".join(f"{p['label']} ({p['probability']:.4f})" for p in r["predictions"])
        print(f"{r['path']}: {shown}" if not r["error"] else f"{r['path']}: unreadable ({r['error']})")
    # none readable: one error line, exit 2, no --output written
    segment_predict.report_skipped(len(results), [(r["path"], r["error"]) for r in results if r["error"]])
    if output:
        write_results(results, output)
        print(f"predictions: {output}")
    return 0


def _results_file(outputs: Sequence[str] | None) -> Path | None:
    if not outputs:
        return None
    if len(outputs) != 1 or Path(outputs[0]).suffix.lower() not in {".csv", ".json"}:
        raise UserError(f"--output {' '.join(outputs)}: for a classifier give one .csv or .json file")
    from common.outdir import prepare_output_file

    return prepare_output_file(outputs[0], "--output")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
