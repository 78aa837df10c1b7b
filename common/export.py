"""Export a checkpoint to ONNX and check the file: the graph's input and output, the metadata a
consumer needs (classes, mean/std, input size, task), the exporter (torch.export-based from opset
18, TorchScript-based below), onnx.checker, then onnxruntime against PyTorch. export_onnx.py is
the command line; this module is the work. onnx and onnxruntime are imported where used (after
check_args has said clearly what is missing), torch as well, so export_onnx.py reads its
constants and answers --help without them."""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .outdir import prepare_output_file, write_failure

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from .inference import LoadedModel

DEFAULT_OPSET = 18
DYNAMO_MIN_OPSET = 18  # the torch.export-based exporter writes opset 18 and newer only
MIN_OPSET = 9
METADATA_FORMAT = "gpu-toolkit-onnx"
INPUT_NAME = "input"
CHECK_BATCHES = (1, 4)
EXPORTDB = "https://pytorch.org/docs/stable/generated/exportdb/index.html"


@dataclass
class ExportSpec:
    """What the graph takes and gives, and what its metadata says."""
    sample_shape: tuple[int, ...]  # one input, without the batch axis
    output_name: str
    metadata: dict[str, str]
    # (C, H, W) inputs with dynamic height and width, at least this many pixels a side (a U-Net);
    # 0: the spatial size is fixed
    min_side: int = 0


def export_spec(loaded: LoadedModel, img_size: int | None) -> ExportSpec:
    """Input shape, output name and task metadata, from the loaded model's task and preprocessing.
    A new task (segmentation, timeseries) is one more branch here."""
    if loaded.task == "classification":
        pre = dict(loaded.preprocessing)
        if img_size is not None and img_size != pre["img_size"]:
            ratio = pre.get("resize_size", pre["img_size"]) / pre["img_size"]  # keeps the crop fraction
            pre["resize_size"] = int(img_size * ratio + 0.5)
            pre["img_size"] = img_size
        size, channels = int(pre["img_size"]), int(pre.get("channels", 3))
        meta = {"classes": json.dumps(loaded.classes or []), "mean": json.dumps(pre["mean"]),
                "std": json.dumps(pre["std"]), "img_size": str(size), "channels": str(channels),
                "preprocessing": json.dumps(pre, sort_keys=True),
                "input_format": f"float32 NCHW, RGB scaled to 0-1 then (x - mean) / std; resize to "
                                f"{pre.get('resize_size', size)}, centre crop {size}",
                "output_format": "logits: one score per class, in the order of classes"}
        return ExportSpec((channels, size, size), "logits", meta)
    if loaded.task == "segmentation":
        pre = dict(loaded.preprocessing)
        from .models.unet import MIN_SIZE

        size, channels = int(img_size or 256), int(pre.get("channels", 3))
        mask_values = loaded.mask_values or []
        meta = {"mask_values": json.dumps(mask_values), "scale": str(pre.get("scale", 1.0)),
                "img_size": "any", "channels": str(channels),
                "preprocessing": json.dumps(pre, sort_keys=True),
                "input_format": f"float32 NCHW, RGB scaled to 0-1 (no mean/std); images resized by "
                                f"scale {pre.get('scale', 1.0)}; any height and width of at least "
                                f"{MIN_SIZE} px (dynamic axes)",
                "output_format": "logits NxCxHxW at the input's height and width: argmax over C "
                                 "(sigmoid > 0.5 with one class) gives the index into mask_values"}
        return ExportSpec((channels, size, size), "logits", meta, min_side=MIN_SIZE)
    if loaded.task == "timeseries":
        pre = dict(loaded.preprocessing)
        steps, channels = int(pre["window_size"]), list(pre["channels"])
        meta = {"classes": json.dumps(loaded.classes or []), "channels": json.dumps(channels),
                "window_size": str(steps), "mean": json.dumps(pre["mean"]), "std": json.dumps(pre["std"]),
                "preprocessing": json.dumps(pre, sort_keys=True),
                "input_format": f"float32 N x {len(channels)} x {steps}: channels (in the order of "
                                "channels) by time steps, each channel (x - mean) / std",
                "output_format": "logits: one score per class, in the order of classes"}
        return ExportSpec((len(channels), steps), "logits", meta)
    raise UserError(f"{loaded.path} is a {loaded.task} model; export_onnx.py exports classification, "
                    "segmentation and time-series models")


def model_name(loaded: LoadedModel) -> str:
    return str(loaded.spec["name"]) if loaded.spec else type(loaded.model).__name__


def base_metadata(loaded: LoadedModel, opset: int) -> dict[str, str]:
    import torch

    from .checkpoint import VERSION, sha256_of

    source = str(loaded.spec.get("source", "unknown")) if loaded.spec else "pickled module"
    meta = {"format": METADATA_FORMAT, "format_version": str(VERSION), "task": loaded.task,
            "model_name": model_name(loaded), "model_source": source,
            "source_checkpoint": loaded.path.name, "checkpoint_sha256": sha256_of(loaded.path),
            "opset": str(opset), "exported_with": f"torch {torch.__version__}"}
    if loaded.spec:
        meta["model_spec"] = json.dumps(loaded.spec, sort_keys=True)
    return meta


# --- exporting ------------------------------------------------------------------------------

@contextlib.contextmanager
def quiet(buffer: io.StringIO, show: bool) -> Iterator[None]:
    """Keep the exporter's progress lines, warnings and tracebacks off the console: Python-level
    output (torch's and onnxscript's loggers write to the current sys.stderr) and what C++ writes
    to file descriptors 1 and 2 (the TorchScript-based exporter's graph dump) go to `buffer`."""
    if show:
        yield
        return
    for stream in (sys.stdout, sys.stderr):  # what was printed before goes out first
        if stream is not None:
            stream.flush()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer), \
            warnings.catch_warnings(record=True), native_output_to(buffer):
        warnings.simplefilter("always")
        yield


@contextlib.contextmanager
def native_output_to(buffer: io.StringIO) -> Iterator[None]:
    with tempfile.TemporaryFile() as sink:
        try:
            saved = [os.dup(1), os.dup(2)]
        except OSError:  # no console (pythonw): nothing to keep clean
            yield
            return
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            buffer.write(sink.read().decode("utf-8", errors="replace"))


def export_model(model: nn.Module, name: str, example: torch.Tensor, path: Path, spec: ExportSpec,
                 opset: int, dynamic: bool, verbose: bool) -> str:
    """Write the graph to `path`; returns which exporter wrote it."""
    import torch

    names = {"input_names": [INPUT_NAME], "output_names": [spec.output_name], "opset_version": opset}
    log = io.StringIO()
    try:
        with quiet(log, verbose):
            if opset >= DYNAMO_MIN_OPSET:
                dims = {0: torch.export.Dim("batch", min=1)} if dynamic else {}
                if spec.min_side:
                    dims.update({2: torch.export.Dim("height", min=spec.min_side),
                                 3: torch.export.Dim("width", min=spec.min_side)})
                shapes = (dims,) if dims else None
                program = torch.onnx.export(model, (example,), None, dynamo=True, dynamic_shapes=shapes,
                                            verbose=verbose, **names)
                program.save(path)  # f=None + save(): weights stay inside the file below 2 GB
                return "torch.export-based exporter"
            axis = ({0: "batch"} if dynamic else {}) | ({2: "height", 3: "width"} if spec.min_side else {})
            axes = {INPUT_NAME: axis, spec.output_name: dict(axis)} if axis else None
            torch.onnx.export(model, (example,), str(path), dynamo=False, dynamic_axes=axes,
                              verbose=verbose, **names)
            return "TorchScript-based exporter"
    except OSError:
        raise  # the file could not be written: write_checked says which and why
    except Exception as exc:  # any exporter failure is a limit of the model or exporter: say which
        raise export_failure(exc, log.getvalue(), name, opset, dynamic) from None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OPERATOR_PATTERNS = (
    # torch.export-based: a graph node without an ONNX translation
    re.compile(r"No ONNX function found for <OpOverload\(op='(?P<op>[\w.]+)', overload='(?P<overload>\w+)'"),
    # torch.export-based: a translation that exists but failed for this node
    re.compile(r"Error when translating node .*?target=(?:torch\.ops\.)?(?P<op>\w+\.\w+)\.(?P<overload>\w+)"),
    # TorchScript-based
    re.compile(r"operator '?(?P<op>\w+::\w+)'? to ONNX opset"),
    re.compile(r"unrecognized namespace (?P<op>\w+::\w+)"),
)


def unsupported_operator(text: str) -> str | None:
    """The operator an exporter error is about, as aten::name (with .overload unless default)."""
    for pattern in _OPERATOR_PATTERNS:
        match = pattern.search(text)
        if match:
            op = match["op"].replace(".", "::", 1)
            overload = match.groupdict().get("overload")
            return op if overload in (None, "default") else f"{op}.{overload}"
    return None


def short_reason(text: str, limit: int = 200) -> str:
    """The innermost cause of an exporter error, on one line."""
    text = _ANSI.sub("", text)
    summary = text.split("## Exception summary", 1)
    if len(summary) == 2:
        entry = summary[1].strip().split("\n\n", 1)[0].split("\n⬆️", 1)[0]
        text = re.sub(r"^<class '[\w.]+'>: ", "", entry)
    text = " ".join(text.split())
    return text[:limit] + ("..." if len(text) > limit else "")


def export_failure(exc: BaseException, log: str, name: str, opset: int, dynamic: bool) -> UserError:
    text = _ANSI.sub("", str(exc))
    reason = short_reason(text) or type(exc).__name__
    op = unsupported_operator(text) or unsupported_operator(log)
    if op:
        return UserError(f"cannot export {name}: operator {op} is not supported by the ONNX exporter at "
                         f"opset {opset}; try another --opset, or replace that operation in the model "
                         f"(exporter: {reason})")
    if dynamic and "Constraints violated" in text:
        return UserError(f"cannot export {name} with a dynamic batch axis: the model fixes the batch "
                         f"size ({reason}); pass --static-batch")
    if "step 1/3" in text or type(exc).__name__ == "TorchExportError":
        where = re.search(r'File "([^"]+)", line (\d+), in (\w+)', text)
        at = f" at {Path(where[1]).name}:{where[2]} in {where[3]}()" if where else ""
        return UserError(f"cannot export {name}: torch.export cannot trace its forward{at} ({reason}); "
                         f"it may branch on tensor values or use Python the exporter cannot follow, "
                         f"see {EXPORTDB}")
    return UserError(f"cannot export {name} at opset {opset} ({type(exc).__name__}: {reason}); "
                     "try another --opset")


# --- the finished file ------------------------------------------------------------------------

def finish_file(path: Path, opset: int, metadata: dict[str, str], doc: str) -> None:
    """Check the opset the exporter really wrote, and add the metadata."""
    import onnx

    model = onnx.load(str(path))
    written = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:  # the exporter falls back to its own opset when a conversion fails
        raise UserError(f"the exporter could not convert the model to opset {opset} (it wrote opset "
                        f"{written}); use --opset {written}")
    del model.metadata_props[:]
    for key, value in sorted(metadata.items()):
        model.metadata_props.add(key=key, value=value)
    model.doc_string = doc
    big = sum(len(t.raw_data) for t in model.graph.initializer) > 1_800_000_000
    onnx.save_model(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=f"{path.name}.data")


def check_model_file(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise UserError(f"the exported file fails onnx.checker ({short_reason(str(exc))}); "
                        "try another --opset") from None


def onnxruntime_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no C++ warnings on the console
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types
        raise UserError(f"onnxruntime {ort.__version__} cannot load the exported file "
                        f"({type(exc).__name__}: {short_reason(str(exc))}); try a lower --opset") from None


def torch_outputs(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """The PyTorch model's output; a model that cannot take this input is a UserError."""
    import torch

    try:
        with torch.inference_mode():
            out = model(x)
    except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
        raise UserError(f"the model fails on an input of shape {list(x.shape)} ({short_reason(str(exc))}); "
                        "with --img-size, pick a size the model allows; a model that takes one batch size "
                        "only needs --static-batch") from None
    if not torch.is_tensor(out):
        raise UserError(f"the model returns a {type(out).__name__}, not one tensor; export_onnx.py exports "
                        "models with a single output")
    return out.float().cpu().numpy()


def onnx_outputs(session: Any, x: torch.Tensor) -> np.ndarray:
    import numpy as np

    try:
        return np.asarray(session.run(None, {INPUT_NAME: x.numpy()})[0])
    except Exception as exc:  # onnxruntime's own exception types
        raise UserError(f"onnxruntime fails to run the exported file on a batch of {x.shape[0]} "
                        f"({type(exc).__name__}: {short_reason(str(exc))}); try another --opset") from None


def check_inputs(spec: ExportSpec, batches: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """The inputs the check runs, by label: each batch size at the example's shape; with dynamic
    height and width, also batch 1 at another, odd, non-square size (the axes really are free)."""
    shapes = {f"batch {b}": (b, *spec.sample_shape) for b in batches}
    if spec.min_side:
        channels, height, width = spec.sample_shape
        other = (max(spec.min_side, height // 2 + 3), max(spec.min_side, width + 5))
        shapes[f"batch 1 at {other[0]}x{other[1]}"] = (1, channels, *other)
    return shapes


def max_differences(model: nn.Module, session: Any, spec: ExportSpec,
                    batches: Sequence[int]) -> dict[str, float]:
    """Largest |onnxruntime - PyTorch| per input of check_inputs, on the same random inputs."""
    import numpy as np
    import torch

    generator = torch.Generator().manual_seed(0)
    diffs = {}
    for label, shape in check_inputs(spec, batches).items():
        x = torch.randn(shape, generator=generator)
        expected, got = torch_outputs(model, x), onnx_outputs(session, x)
        if got.shape != expected.shape:
            raise UserError(f"onnxruntime gives {spec.output_name} of shape {list(got.shape)}, PyTorch "
                            f"{list(expected.shape)} ({label}); try another --opset")
        diffs[label] = float(np.max(np.abs(got.astype(np.float64) - expected))) if got.size else 0.0
    return diffs


def check_tolerance(diffs: dict[str, float], atol: float) -> None:
    for label, diff in diffs.items():
        if not diff <= atol:  # also catches NaN
            raise UserError(f"onnxruntime and PyTorch outputs differ by up to {diff:.3g} at {label}, "
                            f"above --atol {atol:g}; the ONNX file was not written. Try another --opset, "
                            "or pass a larger --atol if that difference is acceptable")


# --- the whole export -----------------------------------------------------------------------------

def output_path(args: argparse.Namespace) -> Path:
    out = Path(args.output) if args.output else Path(args.model).with_suffix(".onnx")
    if out.is_dir():
        raise UserError(f"--output {out} is a folder; pass a file name such as {out / 'model.onnx'}")
    if out.resolve() == Path(args.model).resolve():
        raise UserError(f"--output {out} is the checkpoint itself; pass another file name")
    return out


def check_args(args: argparse.Namespace) -> None:
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"export_onnx.py needs {', '.join(missing)}; install them with "
                        "pip install -r requirements.txt")
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= args.opset <= newest:
        raise UserError(f"--opset {args.opset} is out of range; onnx {onnx.__version__} writes opsets "
                        f"{MIN_OPSET} to {newest} (default: {DEFAULT_OPSET})")
    if args.img_size is not None and args.img_size < 1:
        raise UserError(f"--img-size must be a positive number of pixels, got {args.img_size}")
    if args.atol < 0:
        raise UserError(f"--atol must be 0 or more, got {args.atol}")


def summary(path: Path, exporter: str, opset: int, diffs: dict[str, float], atol: float) -> str:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    size = sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data")) if p.exists())

    def describe(values) -> list[str]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or str(d.dim_value) for d in t.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
            out.append(f"{v.name} {dtype} [{', '.join(dims)}]")
        return out

    checks = ", ".join(f"{d:.2g} at {label}" for label, d in diffs.items())
    return "\n".join([f"exported: {path} ({size / 2**20:.2f} MiB, opset {opset}, {exporter})",
                      f"  inputs: {'; '.join(describe(model.graph.input))}",
                      f"  outputs: {'; '.join(describe(model.graph.output))}",
                      f"  check: onnx.checker passed; onnxruntime vs PyTorch max |diff| {checks} "
                      f"(atol {atol:g})",
                      f"  metadata: {', '.join(p.key for p in model.metadata_props)}"])


def export_checkpoint(args: argparse.Namespace) -> int:
    """export_onnx.py's work: load, export into a temporary folder, check, then move into place."""
    import torch  # before onnx (check_args), as when torch was imported at the top

    from .device import select_device
    from .inference import load_from_args

    check_args(args)
    out = prepare_output_file(output_path(args), "--output")  # before the work, not after it
    device = select_device(args.device, log=print)
    loaded = load_from_args(args.model, args, device, log=print, plain_img_size=False)
    spec = export_spec(loaded, args.img_size)
    if args.opset < DYNAMO_MIN_OPSET:
        print(f"notice: opset {args.opset} is below {DYNAMO_MIN_OPSET}; using torch's TorchScript-based "
              "exporter")
    example = torch.randn((1 if args.static_batch else 2, *spec.sample_shape), device=device)
    torch_outputs(loaded.model, example)  # a model that cannot take the input fails here, clearly
    exporter, diffs = write_checked(loaded, spec, example, out, args)
    print(summary(out, exporter, args.opset, diffs, args.atol))
    return 0


def write_checked(loaded: LoadedModel, spec: ExportSpec, example: torch.Tensor, out: Path,
                  args: argparse.Namespace) -> tuple[str, dict[str, float]]:
    """Export, add the metadata and check, in a temporary folder beside `out`; only a file that
    passed every check replaces what was at `out`. Returns the exporter and the differences."""
    try:
        return _write_checked(loaded, spec, example, out, args)
    except OSError as exc:  # a full disk, a refused write: the earlier file at `out` is untouched
        raise write_failure(exc, out, str(out)) from None


def _write_checked(loaded: LoadedModel, spec: ExportSpec, example: torch.Tensor, out: Path,
                   args: argparse.Namespace) -> tuple[str, dict[str, float]]:
    name, dynamic = model_name(loaded), not args.static_batch
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        path = work / out.name
        exporter = export_model(loaded.model, name, example, path, spec, args.opset, dynamic, args.verbose)
        model = loaded.model.to("cpu")  # the reference: PyTorch in float32 on the CPU
        doc = f"{name} ({loaded.task}) exported by export_onnx.py from {loaded.path.name}"
        finish_file(path, args.opset, {**base_metadata(loaded, args.opset), **spec.metadata}, doc)
        check_model_file(path)
        diffs = max_differences(model, onnxruntime_session(path), spec, CHECK_BATCHES if dynamic else (1,))
        check_tolerance(diffs, args.atol)
        for file in work.iterdir():
            os.replace(file, out.parent / file.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return exporter, diffs
