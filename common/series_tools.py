"""Time-series (behaviour) checkpoints in the tools: predict.py on CSV recordings, validate.py and
test_model.py on a folder of recordings. Everything comes from the checkpoint: the channel
columns, the window length, the reading options and the training set's normalisation."""
from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import timeseries as ts
from .engine import evaluate
from .errors import UserError
from .inference import LoadedModel, gather_inputs
from .session import Session
from .tasks import SeriesTask

SERIES_SUFFIXES = {".csv", ".txt", ".tsv"}
# Reading flags that predict.py and validate.py accept too (they override the checkpoint's).
TOOL_FLAGS = ("--fill-missing", "--label-column")


def reading_options(pre: dict[str, Any], args: argparse.Namespace | None) -> dict[str, Any]:
    options = dict(pre.get("options") or {})
    for key in ("fill_missing", "label_column"):
        if args is not None and getattr(args, key, None) is not None:
            options[key] = getattr(args, key)
    return options


def _reworded(exc: UserError, accepted: tuple[str, ...]) -> UserError:
    """The data module's advice names the training script's flags; here only some exist."""
    text = str(exc)
    for flag in re.findall(r"--[a-z][a-z-]*", text):
        if flag not in accepted:
            text = text.replace(flag, f"run_behavior_classification.py {flag}")
    return UserError(text)


def is_recording_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SERIES_SUFFIXES and not path.name.startswith(".")


def gather_recordings(items: list[str]) -> list[Path]:
    """CSV files, folders (recursively) and glob patterns, in order, without repeats."""
    return gather_inputs(items, accept=is_recording_file, kind="CSV recordings")


def model_input(windows: np.ndarray, pre: dict[str, Any]) -> torch.Tensor:
    """(W, T, C) raw windows -> normalised (W, C, T) float32, as in training."""
    normed = ts.normalize(windows.astype(np.float32), {"mean": pre["mean"], "std": pre["std"]})
    return torch.from_numpy(np.ascontiguousarray(normed.transpose(0, 2, 1)))


def recording_windows(path: Path, pre: dict[str, Any], args: argparse.Namespace | None = None
                      ) -> tuple[torch.Tensor, list[int]]:
    options = {**reading_options(pre, args), "window_size": int(pre["window_size"])}
    try:
        windows, starts = ts.read_for_prediction(path, options, list(pre["channels"]))
    except UserError as exc:
        raise _reworded(exc, TOOL_FLAGS) from None
    return model_input(windows, pre), starts


@torch.inference_mode()
def probabilities(loaded: LoadedModel, x: torch.Tensor, s: Session, batch_size: int) -> torch.Tensor:
    out = []
    for chunk in x.split(batch_size):
        with s.precision.autocast():
            out.append(loaded.model(chunk.to(s.device)).float().softmax(dim=1).cpu())
    return torch.cat(out)


def _top(probs: torch.Tensor, classes: list[str], k: int) -> list[dict[str, Any]]:
    values, index = probs.topk(min(k, probs.numel()))
    return [{"label": classes[i], "probability": float(v)}
            for v, i in zip(values, index.tolist(), strict=True)]


def predict_recordings(loaded: LoadedModel, paths: list[Path], s: Session, batch_size: int,
                       topk: int, args: argparse.Namespace | None = None) -> list[dict[str, Any]]:
    """One result per recording (its windows' mean probability) with each window's top classes;
    an unreadable file gets its error and the others go on."""
    classes = loaded.classes or []
    results = []
    for path in paths:
        try:
            x, starts = recording_windows(path, loaded.preprocessing, args)
        except UserError as exc:
            results.append({"path": str(path), "predictions": [], "windows": [], "error": str(exc)})
            continue
        probs = probabilities(loaded, x, s, batch_size)
        windows = [{"start": int(st), "predictions": _top(p, classes, topk)}
                   for st, p in zip(starts, probs, strict=True)]
        results.append({"path": str(path), "predictions": _top(probs.mean(0), classes, topk),
                        "windows": windows, "error": ""})
    return results


def write_predictions(results: list[dict[str, Any]], path: Path) -> None:
    """JSON as it is, or CSV: a row per recording (window_start empty) and per window."""
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        return
    import csv

    topk = max((len(r["predictions"]) for r in results), default=0)
    header = ["path", "window_start"] + [f"{kind}{k}" for k in range(1, topk + 1)
                                         for kind in ("label", "prob")] + ["error"]

    def cells(preds):
        flat = [x for p in preds for x in (p["label"], f"{p['probability']:.6f}")]
        return flat + [""] * (2 * topk - len(flat))

    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for r in results:
            writer.writerow([r["path"], "", *cells(r["predictions"]), r["error"]])
            if len(r["windows"]) > 1:
                for w in r["windows"]:
                    writer.writerow([r["path"], w["start"], *cells(w["predictions"]), ""])


def run_predict(loaded: LoadedModel, args: argparse.Namespace, s: Session, output: Path | None) -> int:
    paths = gather_recordings(args.input)
    results = predict_recordings(loaded, paths, s, args.batch_size, args.topk, args)
    for r in results:
        if r["error"]:
            print(f"{r['path']}: unreadable ({r['error']})")
            continue
        shown = ", ".join(f"{p['label']} ({p['probability']:.4f})" for p in r["predictions"])
        extra = f" [mean of {len(r['windows'])} windows]" if len(r["windows"]) > 1 else ""
        print(f"{r['path']}: {shown}{extra}")
    bad = sum(1 for r in results if r["error"])
    print(f"{len(results) - bad} recording(s) predicted" + (f", {bad} unreadable and skipped" if bad else ""))
    if output:
        write_predictions(results, output)
        print(f"predictions: {output}")
    return 0


def labelled_windows(data_dir: Path, loaded: LoadedModel, args: argparse.Namespace | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every window of data_dir with the model's class indices; a class the model does not know
    is an error naming it."""
    pre, classes = loaded.preprocessing, list(loaded.classes or [])
    accepted = TOOL_FLAGS if args is not None and hasattr(args, "fill_missing") else ()
    try:
        X, labels, ids, _ = ts.load_for_evaluation(data_dir, reading_options(pre, args),
                                                   list(pre["channels"]), int(pre["window_size"]))
    except UserError as exc:
        raise _reworded(exc, accepted) from None
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise UserError(f"classes in {data_dir} unknown to the model: {', '.join(unknown[:10])} (the model "
                        f"knows: {', '.join(classes[:10])}); remove or rename them")
    y = torch.tensor([classes.index(label) for label in labels], dtype=torch.int64)
    return model_input(X, pre), y, ids


def evaluate_folder(loaded: LoadedModel, data_dir: Path, s: Session, batch_size: int,
                    limit: int | None = None, args: argparse.Namespace | None = None
                    ) -> tuple[dict[str, torch.Tensor], int]:
    """Totals (loss, accuracy, confusion) of the model on the windows of data_dir (only those of
    the recordings a --files list names, where args has one)."""
    x, y, ids = labelled_windows(data_dir, loaded, args)
    if args is not None and getattr(args, "files", None):
        x, y = _listed_windows(x, y, ids, data_dir, Path(args.files))
    if limit is not None:
        x, y = x[:limit], y[:limit]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
    task = SeriesTask(len(loaded.classes or []))
    return evaluate(loaded.model, task, loader, s.precision, s.device), len(y)


def _listed_windows(x: torch.Tensor, y: torch.Tensor, ids: list[str], data_dir: Path,
                    listing: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows of the recordings --files lists (the behaviour pipeline's test_files.txt)."""
    from .validation import check_all_listed, read_held_out

    names = read_held_out(listing, images=False)
    check_all_listed(names, set(ids), listing, data_dir, "recording")
    wanted = set(names)
    keep = torch.tensor([i in wanted for i in ids], dtype=torch.bool)
    return x[keep], y[keep]


def validate_recordings(loaded: LoadedModel, args: argparse.Namespace, s: Session,
                        report: Callable[..., str]) -> int:
    """validate.py for a behaviour model: every window of a folder (or CSV / .npz file) of
    recordings; `report` is validate.py's table of metrics and per-class scores."""
    from .metrics import per_class_scores
    from .reporting import plot_confusion_matrix

    classes = loaded.classes or []
    totals, count = evaluate_folder(loaded, Path(args.data_dir), s, args.batch_size, args=args)
    metrics = SeriesTask(len(classes)).summarize(totals)
    scores = per_class_scores(totals["confusion"])
    print(report(metrics, scores, classes, count, unit="windows"))
    out_dir = args.report_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_confusion_matrix(totals["confusion"].tolist(), classes, out_dir / "confusion_matrix.png")
    print(f"confusion matrix: {out_dir / 'confusion_matrix.png'}")
    if args.results_file:
        result = {"checkpoint": str(args.model), "data_dir": str(args.data_dir), "windows": count,
                  "metrics": metrics, "classes": classes, "per_class": scores,
                  "confusion_matrix": totals["confusion"].tolist()}
        Path(args.results_file).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"results: {args.results_file}")
    return 0
