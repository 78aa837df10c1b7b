"""Behaviour classification recipe (run_behavior_classification.py): sensor recordings ->
windows -> cnn / transformer / fusion models trained on the one engine -> a comparison.

The pipeline: check the data, train each model (OUTPUT/<model>/), evaluate each on the test
split, then the comparison table (console, report.md, results.json) and a confusion matrix per
model. The guide's JSON config keys (learning_rate, num_epochs, dataloader_params, ...) are read
as well as the flag names.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt_lib
from .behavior_args import MODELS
from .cli import check_positive, coerce_values, read_json_object, resolve
from .data import timeseries as ts
from .data.loaders import make_loader
from .distributed import barrier
from .engine import evaluate
from .errors import UserError
from .metrics import per_class_scores
from .models import build_model
from .reporting import attach_log_file, plot_confusion_matrix
from .session import Session, archive_previous_run, save_run_config
from .tasks import SeriesTask
from .trainer import Job, finish_run, in_session, place_model, run_job

TASK = "timeseries"
QUICK_START = {"epochs": 8}
# The guide's gpu_config.json keys -> flag names (use_gpu is the opposite of --no-gpu).
GUIDE_KEYS = {"data_dir": "data_dir", "batch_size": "batch_size", "learning_rate": "lr",
              "num_epochs": "epochs", "model_types": "models", "use_gpu": "no_gpu", "device_id": "gpu_id",
              "use_amp": "amp", "compile_model": "compile", "multi_gpu": "multi_gpu"}
LOADER_KEYS = ("num_workers", "pin_memory", "persistent_workers", "prefetch_factor", "drop_last")
RESULT_FILES = ("report.md", "results.json", "splits.json", "test_files.txt", *MODELS)


def read_guide_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """--config FILE.json with the guide's keys or the flag names; unknown keys are an error."""
    file, raw = Path(path), read_json_object(path)
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "dataloader_params":
            flat.update(_loader_params(value, file))
        elif key in GUIDE_KEYS:
            flat[GUIDE_KEYS[key]] = (not value) if key == "use_gpu" and isinstance(value, bool) else value
        else:
            flat[key] = value
    models = flat.pop("models", None)
    try:
        values = coerce_values(flat, parser, source=f"config file {file}")
    except UserError as exc:
        if "unknown key" not in str(exc):
            raise
        valid = ", ".join([*GUIDE_KEYS, "dataloader_params"])
        raise UserError(f"{exc}; or the guide's keys: {valid}") from None
    if models is not None:
        values["models"] = _model_list(models, file)
    return values


def _loader_params(value: Any, file: Path) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UserError(f"config file {file}: dataloader_params must be a JSON object")
    unknown = sorted(set(value) - set(LOADER_KEYS))
    if unknown:
        raise UserError(f"config file {file}: unknown key(s) {', '.join(unknown)} in dataloader_params; "
                        f"valid keys: {', '.join(LOADER_KEYS)}")
    return dict(value)


def _model_list(models: Any, file: Path) -> list[str]:
    if isinstance(models, str):
        models = [models]
    if not isinstance(models, list) or not models or any(m not in MODELS for m in models):
        raise UserError(f"config file {file}: model_types must be a list of {', '.join(MODELS)}; "
                        f"got {models!r}")
    return list(models)


def resolve_args(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    first, _ = resolve(parser, argv, read_config=read_guide_config)
    layers = [QUICK_START] if first.quick_start else []
    args, _ = resolve(parser, argv, layers, read_config=read_guide_config)
    if args.resume:
        raise UserError("--resume is not supported by run_behavior_classification.py; each model's "
                        "checkpoint.pth is in OUTPUT/<model>/, rerun the pipeline to train again")
    return args


def check_args(args: argparse.Namespace) -> None:
    check_positive(args, "batch_size", "epochs", "accumulate_grad_batches", "log_interval",
                   "early_stopping_patience", "width", "depth", "prefetch_factor")
    if args.window_size is not None and args.window_size < 8:
        raise UserError(f"--window-size must be at least 8 steps, got {args.window_size}")
    if args.stride is not None and args.stride < 1:
        raise UserError(f"--stride must be 1 or more, got {args.stride}")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    return in_session(args, None, lambda a, _c, s: _pipeline(a, s))


def load_data(args: argparse.Namespace, s: Session) -> ts.SeriesData:
    channels = [c.strip() for c in args.channels.split(",") if c.strip()] if args.channels else None
    data = ts.load_series_data(None if args.data_glob else args.data_dir, data_glob=args.data_glob,
                               label_column=args.label_column, group_column=args.group_column,
                               time_column=args.time_column, channels=channels,
                               window_size=args.window_size, stride=args.stride,
                               pure_windows=args.pure_windows, fill_missing=args.fill_missing,
                               val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                               seed=args.seed)
    for note in data.notes:
        s.log(f"data: {note}")
    for line in data_table(data):
        s.log(line)
    return data


def data_table(data: ts.SeriesData) -> list[str]:
    """The data check: channels, window length, and windows per class and split."""
    names = ", ".join(data.channels[:12]) + (" ..." if len(data.channels) > 12 else "")
    lines = [f"data: {data.layout} layout, {len(data.channels)} channels ({names}), windows of "
             f"{data.window_size} steps, {len(data.classes)} classes"]
    width = max(8, *(len(c) for c in data.classes))
    lines.append("  " + "split".ljust(8) + "".join(c.rjust(width + 2) for c in data.classes)
                 + "total".rjust(8) + "  recordings")
    for split, part in data.splits.items():
        counts = [int((part.y == k).sum()) for k in range(len(data.classes))]
        lines.append("  " + split.ljust(8) + "".join(str(n).rjust(width + 2) for n in counts)
                     + str(len(part.y)).rjust(8) + f"  {len(data.split_ids.get(split, []))}")
    return lines


def series_preprocessing(data: ts.SeriesData, stats: dict[str, Any]) -> dict[str, Any]:
    """What predict.py needs to turn a CSV into the model's input, exactly as in training."""
    return {"window_size": int(data.window_size), "channels": list(data.channels),
            "mean": [float(v) for v in stats["mean"]], "std": [float(v) for v in stats["std"]],
            "layout": data.layout, "options": dict(data.options)}


def make_loaders(args: argparse.Namespace, s: Session, data: ts.SeriesData, stats: dict[str, Any]
                 ) -> dict[str, Any]:
    common = {"num_workers": s.num_workers, "pin_memory": s.pin_memory, "rank": s.ctx.rank,
              "world_size": s.ctx.world_size, "persistent_workers": bool(args.persistent_workers),
              "prefetch_factor": args.prefetch_factor}
    return {name: make_loader(ts.SeriesDataset(part.X, part.y, stats), args.batch_size, train=name == "train",
                              seed=args.seed, drop_last=args.drop_last and name == "train", **common)
            for name, part in data.splits.items()}


def _write_held_out(s: Session, data: ts.SeriesData) -> None:
    """test_files.txt: the recordings of the final split, when the split was drawn from one folder
    (a test/ folder is a held-out folder already), for `validate.py --files`."""
    args = s.args
    if not getattr(args, "data_dir", None) or getattr(args, "data_glob", None):
        return
    root = Path(args.data_dir)
    if not root.is_dir() or any((root / split).is_dir() for split in ("train", "val", "test")):
        return
    from .outdir import write_atomically
    from .validation import TEST_HELD_OUT, held_out_text

    final = "test" if "test" in data.split_ids else "val"
    text = held_out_text(root, data.split_ids[final], ids=True,
                         what=f"the recordings of the {final} split, which no model trained on")
    write_atomically(s.output / TEST_HELD_OUT, lambda fh: fh.write(text))


def _open_results(s: Session, data: ts.SeriesData) -> None:
    """Move an earlier run aside, start training.log, write the split; data is known good here."""
    if s.is_main:
        archive_previous_run(s.output, RESULT_FILES)
        s.output.mkdir(parents=True, exist_ok=True)
        attach_log_file(s.output)
        ts.write_splits_json(data, s.output / "splits.json")
        _write_held_out(s, data)
    barrier()
    save_run_config(s)


def _pipeline(args: argparse.Namespace, s: Session) -> int:
    data = load_data(args, s)
    stats = ts.fit_normalizer(data.splits["train"].X)
    loaders = make_loaders(args, s, data, stats)
    final = "test" if "test" in data.splits else "val"
    if final == "val":
        s.log("notice: no test split (no test/ folder): the final evaluation is on the validation split")
    _open_results(s, data)
    results = {name: train_and_evaluate(name, args, s, data, stats, loaders, final) for name in args.models}
    if s.is_main:
        write_report(s.output, results, data, final, args)
        for line in comparison_table(results, final):
            s.log(line)
        best = max(results, key=lambda n: (results[n]["test_accuracy"], results[n]["macro_f1"]))
        accuracy = f"{final} accuracy {100 * results[best]['test_accuracy']:.2f}%"
        finish_run(s, args, f"done: best model {best} ({accuracy}); "
                   f"report {s.output / 'report.md'}, results {s.output / 'results.json'}, checkpoints "
                   f"{s.output}/<model>/best_model.pth", task=TASK, model=s.output / best / "best_model.pth",
                   best=f"{best}, {accuracy} (its best epoch {results[best]['best_epoch']})")
    return 0


def train_and_evaluate(name: str, args: argparse.Namespace, s: Session, data: ts.SeriesData,
                       stats: dict[str, Any], loaders: dict[str, Any], final: str) -> dict[str, Any]:
    sub = replace(s, output=s.output / name, log_file=False)
    s.log(f"== {name} ==")
    model, spec = build_model(name, len(data.classes), in_chans=len(data.channels), width=args.width,
                              depth=args.depth)
    trained, plain = place_model(model, args, sub, False, f"{name} (width {args.width}, depth {args.depth})")
    task = SeriesTask(len(data.classes), args.label_smoothing)
    job = Job(task=task, model=trained, plain=plain, spec=spec,
              meta={"classes": list(data.classes), "preprocessing": series_preprocessing(data, stats)},
              train_loader=loaders["train"], val_loader=loaders["val"], stop_on="loss")
    started = time.perf_counter()
    state = run_job(args, sub, job, None)
    seconds = time.perf_counter() - started
    best = ckpt_lib.load_checkpoint(sub.output / "best_model.pth", task=TASK)
    plain.load_state_dict(best["state_dict"])  # evaluate exactly the file that is shipped
    result = evaluate_model(plain, task, loaders[final], s, data.classes,
                            sub.output / f"confusion_matrix_{final}.png", f"{name} on the {final} split")
    result["predictions"] = recording_predictions(result.pop("predicted"), data.splits[final].ids,
                                                  data.classes)
    result.update(parameters=sum(p.numel() for p in plain.parameters()), train_seconds=seconds,
                  best_epoch=state.best_epoch, val_accuracy=state.best_metric,
                  checkpoint=str(sub.output / "best_model.pth"))
    return result


def evaluate_model(model: torch.nn.Module, task: SeriesTask, loader: Any, s: Session,
                   classes: list[str], picture: Path, title: str) -> dict[str, Any]:
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)
    predicted: list[torch.Tensor] = []  # argmax per batch, kept on the device until the end
    hook = model.register_forward_hook(lambda _m, _i, out: predicted.append(out.argmax(1)))
    try:
        totals = evaluate(model, task, loader, s.precision, s.device)
    finally:
        hook.remove()
    count = max(int(totals["count"]), 1)
    scores = per_class_scores(totals["confusion"])
    present = [f for f, n in zip(scores["f1"], scores["support"], strict=True) if n > 0]
    if s.is_main:
        plot_confusion_matrix(totals["confusion"].tolist(), classes, picture, title=title)
    return {"test_accuracy": task.summarize(totals)["acc"], "macro_f1": sum(present) / max(len(present), 1),
            "inference_ms_per_sample": inference_ms(model, loader, s), "samples": count,
            "confusion_matrix": totals["confusion"].tolist(), "per_class_f1": scores["f1"],
            "predicted": torch.cat(predicted).tolist() if predicted else []}


@torch.inference_mode()
def inference_ms(model: torch.nn.Module, loader: Any, s: Session, budget_s: float = 0.3) -> float:
    """Milliseconds per window of the model alone: the batches are on the device first, one
    warm-up pass, then repeated passes for at least budget_s (one pass over few windows is noise)."""
    batches = [x.to(s.device) for x, _ in loader]
    if not batches:
        return float("nan")
    model.eval()

    def one_pass() -> None:
        for x in batches:
            with s.precision.autocast():
                model(x)
        if s.device.type == "cuda":
            torch.cuda.synchronize(s.device)

    one_pass()
    passes, started = 0, time.perf_counter()
    while passes < 3 or (time.perf_counter() - started < budget_s and passes < 200):
        one_pass()
        passes += 1
    windows = sum(len(x) for x in batches) * passes
    return 1000 * (time.perf_counter() - started) / windows


def recording_predictions(predicted: list[int], ids: list[str], classes: list[str]) -> dict[str, str]:
    """The predicted class per recording (the most frequent over its windows), for results.json.
    Under DDP each process saw its own share, so only complete lists are mapped."""
    if len(predicted) != len(ids):
        return {}
    votes: dict[str, list[int]] = {}
    for rid, k in zip(ids, predicted, strict=True):
        votes.setdefault(rid, []).append(k)
    return {rid: classes[max(set(v), key=v.count)] for rid, v in sorted(votes.items())}


def comparison_table(results: dict[str, dict[str, Any]], final: str) -> list[str]:
    head = (f"{'model':<12} {final + ' acc':>9} {'macro-F1':>9} {'parameters':>11} {'train s':>8} "
            f"{'ms/sample':>10}")
    rows = [head, "-" * len(head)]
    for name, r in results.items():
        rows.append(f"{name:<12} {100 * r['test_accuracy']:>8.2f}% {r['macro_f1']:>9.4f} "
                    f"{r['parameters']:>11,} {r['train_seconds']:>8.1f} "
                    f"{r['inference_ms_per_sample']:>10.3f}")
    return rows


def write_report(out: Path, results: dict[str, dict[str, Any]], data: ts.SeriesData, final: str,
                 args: argparse.Namespace) -> None:
    payload = {"evaluated_on": final, "classes": list(data.classes), "channels": list(data.channels),
               "window_size": data.window_size, "layout": data.layout,
               "windows": {k: int(len(v.y)) for k, v in data.splits.items()},
               "models": results}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    lines = ["# Behaviour classification results", "",
             f"Data: `{args.data_glob or args.data_dir}`, {data.layout} layout, {len(data.channels)} "
             f"channels, windows of {data.window_size} steps, classes: {', '.join(data.classes)}.",
             f"Evaluated on the **{final}** split"
             + (" (there is no test split)." if final == "val" else "."), "",
             f"| model | {final} accuracy | macro-F1 | parameters | train seconds | inference ms/sample "
             "| checkpoint |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {100 * r['test_accuracy']:.2f}% | {r['macro_f1']:.4f} | "
                     f"{r['parameters']:,} | {r['train_seconds']:.1f} | {r['inference_ms_per_sample']:.3f} "
                     f"| `{name}/best_model.pth` |")
    lines += ["", "Confusion matrices: " + ", ".join(f"`{n}/confusion_matrix_{final}.png`" for n in results),
              "Split (recording ids per split): `splits.json`. Settings: `config.json`."]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
