"""Top classes of images from a classification checkpoint: what predict.py does for classifiers.
Unreadable files are listed (in the console and in --output) and skipped; when none can be read,
one error line and exit code 2, and no --output is written."""
from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .data.images import DECODE_ERRORS, describe_error, eval_transform, load_rgb
from .errors import UserError
from .inference import LoadedModel
from .outdir import prepare_output_file, write_atomically
from .segment_predict import report_skipped


class ImageFiles:
    """(tensor, index, error) per file: an unreadable file gives an error string, not a crash.
    A map-style dataset (the DataLoader needs only __len__ and __getitem__)."""

    def __init__(self, paths: Sequence[Path], pre: dict[str, Any]):
        self.paths, self.transform = list(paths), eval_transform(pre)
        self.blank = torch.zeros(pre.get("channels", 3), pre["img_size"], pre["img_size"])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return self.transform(load_rgb(self.paths[index])), index, ""
        except DECODE_ERRORS as exc:
            return self.blank, index, describe_error(exc)


def predict(loaded: LoadedModel, paths: Sequence[Path], s, batch_size: int, topk: int
            ) -> list[dict[str, Any]]:
    """Top-k per file. Results stay on the device until the end: one host read in all."""
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


def results_file(outputs: Sequence[str] | None) -> Path | None:
    if not outputs:
        return None
    if len(outputs) != 1 or Path(outputs[0]).suffix.lower() not in {".csv", ".json"}:
        raise UserError(f"--output {' '.join(outputs)}: for a classifier give one .csv or .json file")
    return prepare_output_file(outputs[0], "--output")


def run(loaded: LoadedModel, paths: Sequence[Path], args, s) -> int:
    """Print the top classes of each file, write --output (checked before the work)."""
    output = results_file(args.output)
    results = predict(loaded, paths, s, args.batch_size, args.topk)
    for r in results:
        shown = ", ".join(f"{p['label']} ({p['probability']:.4f})" for p in r["predictions"])
        print(f"{r['path']}: {shown}" if not r["error"] else f"{r['path']}: unreadable ({r['error']})")
    # none readable: one error line, exit 2, no --output written
    report_skipped(len(results), [(r["path"], r["error"]) for r in results if r["error"]])
    if output:
        write_results(results, output)
        print(f"predictions: {output}")
    return 0


