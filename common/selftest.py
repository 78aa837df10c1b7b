"""The five checks of test_model.py (the command line is there; this module is the work):
file integrity, device, forward pass, quick evaluation and memory, each a Result marked
passed, failed or skipped, run in order with what the earlier ones found (Run)."""

from __future__ import annotations

import argparse
import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError, user_message
from .inference import ALL_TASKS, folder_samples, load_for_inference, names, nonfinite_tensors

if TYPE_CHECKING:
    import torch

    from .inference import LoadedModel
    from .precision import Precision

MARKS = {"pass": "\u2705", "fail": "\u274c", "skip": "\u2796"}  # check mark, cross, heavy minus
ASCII_MARKS = {"pass": "[PASS]", "fail": "[FAIL]", "skip": "[SKIP]"}
READY = "all checks passed: the model is ready for fine-tuning"
# finetune_gpu.py fine-tunes image classifiers; other checkpoints are ready to use (and to train on)
READY_OTHER = {"segmentation": "all checks passed: the model is ready to use (continue training it with "
                               "train_unet.py --load)",
               "timeseries": "all checks passed: the model is ready to use (predict.py on CSV recordings)"}
DATA_HINT = {"segmentation": "a folder with imgs/ and masks/ to measure Dice",
             "timeseries": "a folder of CSV recordings to measure accuracy"}
INDENT = " " * 6


@dataclass
class Result:
    status: str  # "pass" | "fail" | "skip"
    summary: str
    details: list[str] = field(default_factory=list)


@dataclass
class Run:
    """The settings, and what the earlier checks found for the later ones."""
    args: argparse.Namespace
    given: set[str]                     # the flags typed on the command line
    device: torch.device
    precision: Precision
    notices: list[str]
    loaded: LoadedModel | None = None   # set by check 1 when the weights load
    device_ok: bool = True              # check 2
    num_classes: int | None = None      # check 3: the width of the output
    forward_ok: bool = False            # check 3
    weights_bytes: int | None = None    # CUDA: memory of the model on the GPU
    forward_peak: int | None = None     # CUDA: peak memory of the forward pass


def prepare(args: argparse.Namespace, given: set[str]) -> Run:
    """Check the values and choose the device; a bad value is a UserError (exit code 2) before
    any check runs."""
    from .cli import check_positive
    from .device import select_device, set_memory_fraction
    from .models import find_source
    from .precision import make_precision

    check_positive(args, "batches", "batch_size", "img_size")
    path = Path(args.model_path)
    if not path.exists():  # a typo in the path: the command is wrong, not the model
        raise UserError(f"model file {path} does not exist; pass --model-path with a saved model "
                        "(best_model.pth, checkpoint.pth or a *_finetuned.pt)")
    if path.is_dir():
        raise UserError(f"--model-path {path} is a folder; pass the .pth file inside it")
    if args.num_classes is not None:
        check_positive(args, "num_classes")
    if args.arch:
        find_source(args.arch)  # an unknown name is a UserError with suggestions
    notices: list[str] = []
    device = select_device(args.device, args.gpu_id, args.no_gpu, log=notices.append)
    set_memory_fraction(args.gpu_memory_fraction, device, notices.append)
    precision = make_precision(device, args.amp, args.amp_dtype, notices.append)
    return Run(args, given, device, precision, notices)


# ---------------------------------------------------------------- 1. file integrity

def check_integrity(run: Run) -> Result:
    from .checkpoint import sha256_of

    path = Path(run.args.model_path)
    loaded, problem = _load(run, path)
    if loaded is None:
        return Result("fail", problem)
    run.loaded = loaded
    details = [f"file: {path} ({path.stat().st_size / 2**20:.1f} MiB), sha256 {sha256_of(path)}",
               *_describe_model(loaded)]
    bad = nonfinite_tensors(loaded.model)
    if bad:
        return Result("fail", f"non-finite weights (NaN/Inf) in {len(bad)} tensor(s): "
                      f"{names(bad, 8)}; use an earlier checkpoint", details)
    details.append("weights: every floating-point tensor is finite")
    return Result("pass", f"{_kind(loaded)}, {_architecture(loaded)}, {_count_params(loaded)} parameters",
                  details + _ignored_flags(run))


def _load(run: Run, path: Path) -> tuple[LoadedModel | None, str]:
    """The model on the CPU, or None and the one-line reason it cannot be loaded."""
    import torch

    args = run.args
    try:
        loaded = load_for_inference(path, torch.device("cpu"), tasks=ALL_TASKS, trust=args.trust_checkpoint,
                                    arch=args.arch, num_classes=args.num_classes, img_size=args.img_size)
    except UserError as exc:
        return None, user_message(exc)
    return loaded, ""


def _kind(loaded: LoadedModel) -> str:
    from .checkpoint import FORMAT

    if loaded.checkpoint is not None:
        return f"{FORMAT} v{loaded.checkpoint.get('version', '?')}"
    return "a plain state_dict" if loaded.spec is not None else "a whole pickled model"


def _architecture(loaded: LoadedModel) -> str:
    if loaded.spec is not None:
        return f"{loaded.spec['name']} ({loaded.spec.get('source', '?')})"
    return type(loaded.model).__name__


def _count_params(loaded: LoadedModel) -> str:
    return f"{sum(p.numel() for p in loaded.model.parameters()):,}"


def _describe_model(loaded: LoadedModel) -> list[str]:
    model, pre = loaded.model, loaded.preprocessing
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines = [f"parameters: {_count_params(loaded)} ({trainable:,} trainable); "
             f"{len(model.state_dict())} tensors, names and shapes fit {_architecture(loaded)}"]
    if loaded.checkpoint is not None:
        ckpt = loaded.checkpoint
        versions = ckpt.get("versions") or {}
        lines.append(f"task: {loaded.task}, saved {ckpt.get('saved_at', '?')} with torch "
                     f"{versions.get('torch', '?')}")
    if loaded.classes:
        lines.append(f"classes ({len(loaded.classes)}): {names(loaded.classes, 10)}")
    if "img_size" in pre:
        lines.append(f"input: {pre.get('channels', 3)} x {pre['img_size']} x {pre['img_size']}")
    if "window_size" in pre:
        lines.append(f"input: {len(pre['channels'])} channels ({names(pre['channels'], 8)}) x "
                     f"{pre['window_size']} steps")
    else:
        lines.append(f"input: {pre.get('channels', 3)} channels, any size, images scaled by "
                     f"{pre.get('scale', 1.0)}")
    metrics = {k: v for k, v in ((loaded.checkpoint or {}).get("metrics") or {}).items()
               if k not in {"lr", "epoch_time", "samples_per_s"}}
    if metrics:
        lines.append("metrics at save time: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    return lines + loaded.notes


def _ignored_flags(run: Run) -> list[str]:
    if run.loaded is None or run.loaded.checkpoint is None:
        return []
    given = [f"--{name.replace('_', '-')}" for name in ("arch", "num_classes", "img_size")
             if name in run.given]
    if not given:
        return []
    return [f"notice: {', '.join(given)} ignored: the checkpoint records its architecture and input size"]


# ---------------------------------------------------------------- 2. device

def check_device(run: Run) -> Result:
    import torch

    device, details = run.device, list(run.notices)
    if device.type == "cuda":
        return _cuda_device(run, details)
    if device.type == "mps":
        return Result("pass", "Apple GPU (mps)", details)
    details.append(_why_cpu(run.args))
    return Result("pass", f"CPU only ({torch.get_num_threads()} threads), no GPU in use: fine for this "
                  "test, slow for fine-tuning", details)


def _cuda_device(run: Run, details: list[str]) -> Result:
    import torch

    from .device import describe

    device = run.device
    try:
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        torch.ones(8, device=device).sum().item()  # the GPU really runs a kernel
    except RuntimeError as exc:
        run.device_ok = False
        return Result("fail", f"{device} is visible but does not work ({_short(exc)}); check the driver "
                      "with nvidia-smi, or run with --no-gpu", details)
    details += [f"memory: {total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free",
                f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
                f"compute capability {props.major}.{props.minor}, {torch.cuda.device_count()} GPU(s) visible"]
    return Result("pass", describe(device).removeprefix("device: "), details)


def _why_cpu(args: argparse.Namespace) -> str:
    import torch

    if torch.cuda.is_available():
        return "a GPU is present but not used (--no-gpu or --device cpu)"
    if torch.version.cuda is None:
        return f"this PyTorch ({torch.__version__}) is a CPU-only build; install a CUDA build to use a GPU"
    return (f"PyTorch is built with CUDA {torch.version.cuda} but sees no GPU "
            "(no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides it)")


# ---------------------------------------------------------------- 3. forward pass

def check_forward(run: Run) -> Result:
    import torch

    if run.loaded is None:
        return Result("skip", "needs a model that loads (check 1 failed)")
    if not run.device_ok:
        return Result("skip", "needs a working device (check 2 failed)")
    pre, batch = run.loaded.preprocessing, run.args.batch_size
    if run.loaded.task == "timeseries":  # windows: channels x time steps
        shape: tuple[int, ...] = (batch, len(pre["channels"]), int(pre["window_size"]))
    else:
        side = int(pre.get("img_size", 64))  # a U-Net takes any size: 64x64 is enough to check it
        shape = (batch, int(pre.get("channels", 3)), side, side)
    inputs = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    try:
        outputs = _forward(run, inputs)
    except Exception as exc:  # the model's own code (a pickled model) may raise anything
        hint = "; lower --batch-size" if isinstance(exc, torch.cuda.OutOfMemoryError) else ""
        return Result("fail", f"input {tuple(shape)}: {type(exc).__name__}: {_short(exc)}{hint}")
    return _check_outputs(run, shape, outputs)


def _forward(run: Run, inputs: torch.Tensor) -> object:
    import torch

    device = run.device
    model = run.loaded.model.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        run.weights_bytes = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode(), run.precision.autocast():
        outputs = model(inputs.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        run.forward_peak = torch.cuda.max_memory_allocated(device)
    return outputs


def _check_outputs(run: Run, shape: tuple[int, ...], outputs: object) -> Result:
    import torch

    if not torch.is_tensor(outputs):
        return Result("fail", f"the model returns {type(outputs).__name__}, not a tensor of class scores")
    expected = run.loaded.num_classes
    got = tuple(outputs.shape)
    if run.loaded.task == "segmentation":
        return _check_mask_outputs(run, shape, outputs)
    if outputs.dim() != 2 or got[0] != shape[0] or (expected is not None and got[1] != expected):
        want = f"({shape[0]}, {expected})" if expected is not None else f"({shape[0]}, classes)"
        return Result("fail", f"input {shape} gives output {got}, expected {want}")
    bad = int((~torch.isfinite(outputs.float())).sum())
    if bad:
        return Result("fail", f"input {shape} gives output {got} with {bad} NaN/Inf value(s)")
    run.num_classes, run.forward_ok = got[1], True
    details = [] if expected is not None else [f"classes: {got[1]} (the width of the output)"]
    return Result("pass", f"input {shape} -> output {got}, all finite", details)


def _check_mask_outputs(run: Run, shape: tuple[int, ...], outputs: torch.Tensor) -> Result:
    import torch

    classes = run.loaded.spec["kwargs"]["num_classes"]
    want = (shape[0], classes, shape[2], shape[3])
    if tuple(outputs.shape) != want:
        return Result("fail", f"input {shape} gives output {tuple(outputs.shape)}, expected {want}")
    if not bool(torch.isfinite(outputs.float()).all()):
        return Result("fail", f"input {shape} gives NaN/Inf values")
    run.num_classes, run.forward_ok = classes, True
    return Result("pass", f"input {shape} -> masks {want}, all finite")


def _segmentation_eval(run: Run) -> Result:
    """Dice and IoU on the first --batches x --batch-size pairs of data-dir/imgs + masks/."""
    from .data import segmentation as seg
    from .data.loaders import make_loader
    from .engine import evaluate
    from .tasks import SegmentationTask

    args = run.args
    pairs = seg.find_pairs(Path(args.data_dir))[: args.batches * args.batch_size]
    dataset = seg.SegmentationDataset(pairs, run.loaded.mask_values,
                                      run.loaded.preprocessing.get("scale", 0.5))
    loader = make_loader(dataset, args.batch_size, train=False, num_workers=0, pin_memory=False)
    task = SegmentationTask(run.num_classes)
    metrics = task.summarize(evaluate(run.loaded.model, task, loader, run.precision, run.device))
    line = (f"Dice {metrics['dice']:.4f}, IoU {metrics['iou']:.4f} ({len(pairs)} pairs), "
            f"loss {metrics['loss']:.4f}")
    return Result("pass" if math.isfinite(metrics["loss"]) else "fail", line)


def _series_eval(run: Run) -> Result:
    """Accuracy on the first --batches x --batch-size windows of a folder of recordings."""
    from .series_tools import evaluate_folder
    from .tasks import SeriesTask

    args = run.args
    totals, count = evaluate_folder(run.loaded, Path(args.data_dir), run, args.batch_size,
                                    limit=args.batches * args.batch_size)
    metrics = SeriesTask(run.num_classes).summarize(totals)
    line = (f"accuracy {100 * metrics['acc']:.2f}% ({int(totals['correct'])}/{count} windows), "
            f"loss {metrics['loss']:.4f}")
    return Result("pass" if math.isfinite(metrics["loss"]) else "fail", line)


# ---------------------------------------------------------------- 4. quick evaluation

def check_evaluation(run: Run) -> Result:
    from .data.images import ImageDataset, eval_transform
    from .data.loaders import make_loader
    from .device import default_num_workers, resolve_pin_memory
    from .engine import evaluate
    from .tasks import ClassificationTask

    args = run.args
    if not args.data_dir:
        task = run.loaded.task if run.loaded is not None else "classification"
        hint = DATA_HINT.get(task, "a folder of class folders to measure accuracy")
        return Result("skip", f"no --data-dir (pass {hint})")
    if not run.forward_ok:
        return Result("skip", "needs a working forward pass (check 3)")
    if run.loaded.task in ("segmentation", "timeseries"):
        try:
            return _segmentation_eval(run) if run.loaded.task == "segmentation" else _series_eval(run)
        except UserError as exc:
            return Result("fail", user_message(exc))
    try:
        samples, details = eval_samples(Path(args.data_dir), run)
        workers = args.num_workers if args.num_workers is not None else default_num_workers(run.device)
        loader = make_loader(ImageDataset(samples, eval_transform(run.loaded.preprocessing)),
                             args.batch_size, train=False, num_workers=min(workers, args.batches),
                             pin_memory=resolve_pin_memory(args.pin_memory, run.device))
        task = ClassificationTask(run.num_classes)
        totals = evaluate(run.loaded.model, task, loader, run.precision, run.device)
    except UserError as exc:
        return Result("fail", user_message(exc))
    metrics, count = task.summarize(totals), int(totals["count"])
    line = (f"accuracy {100 * metrics['acc']:.2f}% ({int(totals['correct'])}/{count} images, "
            f"{len(loader)} batch(es)), loss {metrics['loss']:.4f}")
    if not math.isfinite(metrics["loss"]):
        return Result("fail", line + ": the loss is not finite", details)
    return Result("pass", line, details)


def eval_samples(data_dir: Path, run: Run) -> tuple[list[tuple[str, int]], list[str]]:
    """A random sample (seed 0) of --batches x --batch-size images, labelled by class name (or,
    for a file without class names, by the class folders in sorted order)."""
    _, samples, details = folder_samples(run.loaded, data_dir, run.num_classes)
    random.Random(0).shuffle(samples)
    chosen = samples[: run.args.batches * run.args.batch_size]
    details.insert(0, f"data: {len(chosen)} of {len(samples)} images in {data_dir} (random sample)")
    return chosen, details


# ---------------------------------------------------------------- 5. memory

def check_memory(run: Run) -> Result:
    if run.device.type == "cuda":
        return _gpu_memory(run)
    peak = peak_rss_bytes()
    if peak is None:
        return Result("skip", "process memory is unavailable on this platform")
    return Result("pass", f"peak process memory (RSS) {_mib(peak)} (no GPU memory to measure on "
                  f"{run.device.type})")


def _gpu_memory(run: Run) -> Result:
    import torch

    if run.forward_peak is None:
        return Result("skip", "needs a forward pass on the GPU (check 3)")
    total = torch.cuda.get_device_properties(run.device).total_memory
    share = run.forward_peak / total
    details = [f"weights on the GPU: {_mib(run.weights_bytes or 0)}"]
    if share > 0.3:
        details.append("notice: training needs several times the memory of a forward pass; "
                       "fine-tune with a smaller --batch-size or --amp")
    return Result("pass", f"peak GPU memory of the forward pass {_mib(run.forward_peak)} at batch size "
                  f"{run.args.batch_size} ({100 * share:.1f}% of {total / 2**30:.1f} GiB)", details)


def peak_rss_bytes(status_file: Path = Path("/proc/self/status")) -> int | None:
    """The process's peak resident memory: getrusage, else VmHWM in /proc/self/status, else None."""
    try:
        import resource
    except ImportError:  # Windows
        resource = None
    if resource is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB elsewhere
    try:
        lines = status_file.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] + ("..." if len(text) > 200 else "")


# ---------------------------------------------------------------- output

CHECKS: tuple[tuple[str, Callable[[Run], Result]], ...] = (
    ("file integrity", check_integrity), ("device", check_device), ("forward pass", check_forward),
    ("quick evaluation", check_evaluation), ("memory", check_memory))


def pick_marks(stream: object) -> dict[str, str]:
    """Emoji marks, or ASCII ones where the stream's encoding cannot write them (cp936, ascii)."""
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        "".join(MARKS.values()).encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return ASCII_MARKS
    return MARKS


def emit(text: str) -> None:
    """Print one line; characters the console cannot encode (in a path, say) become '?'."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        text = text.encode(encoding, "replace").decode(encoding)
    except LookupError:  # an unknown codec name: print as is
        text = str(text)
    print(text, flush=True)


def run_checks(run: Run) -> int:
    """Every check in order, one marked line each; 0 when all passed, 1 when one failed."""
    marks = pick_marks(sys.stdout)
    emit(f"testing {run.args.model_path}")
    results = []
    for number, (name, check) in enumerate(CHECKS, 1):
        result = check(run)
        results.append((name, result))
        emit(f"{marks[result.status]} {number}. {name}: {result.summary}")
        for line in result.details:
            emit(INDENT + line)
    failed = [name for name, r in results if r.status == "fail"]
    if not failed:
        task = run.loaded.task if run.loaded is not None else "classification"
        emit(f"{marks['pass']} {READY_OTHER.get(task, READY)}")
        return 0
    skipped = sum(r.status == "skip" for _, r in results)
    emit(f"{marks['fail']} {len(failed)} of {len(CHECKS)} checks failed ({', '.join(failed)}), {skipped} "
         "skipped: the model is not ready for fine-tuning")
    return 1
