"""The argument groups every script shares, and layered configuration.

Precedence, lowest first: the parser's defaults, `--config FILE.json`, script layers
(the demo preset, a checkpoint's config on --resume), then the flags on the command line.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import UserError

_UNSET = object()

# Keys that describe one invocation, not the run: never inherited from a checkpoint.
# trust_checkpoint too: trusting a pickle is a decision about one file, made on the command line
# each time, never carried by a --config file or into a resumed run.
PER_INVOCATION = frozenset({"config", "resume", "list_models", "demo", "trust_checkpoint"})
# Keys a --config file may not set (and config.json leaves out, so it can be passed back).
NOT_IN_CONFIG = PER_INVOCATION - {"demo"}
# Keys tied to the machine; a resumed run takes them from the new command line or defaults.
MACHINE_KEYS = frozenset({"device", "gpu_id", "no_gpu", "num_workers", "pin_memory",
                          "gpu_memory_fraction"})


def tristate(value: str) -> bool | str:
    """Parse auto/true/false (accepting True/False/1/0/yes/no, as the guides write them)."""
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected auto, true or false, got {value!r}")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help strings write their default as %(default)s, so that `--help` shows the value a run
    really uses, also after a script's set_defaults(); a default of None reads "off"."""

    def _expand_help(self, action: argparse.Action) -> str:
        if action.default is None and "%(default)" in (action.help or ""):
            action = copy.copy(action)
            action.default = "off"
        return super()._expand_help(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose "unrecognized arguments" error names blank arguments: a command
    pasted from a guide with `\\ # comment` after the line break hands the script a lone space."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            blank = sum(1 for a in extras if not a.strip())
            shown = " ".join(repr(a) if not a.strip() else a for a in extras)
            hint = (f"; {blank} of them blank (only spaces): in a command over several lines the backslash "
                    "must be the last character of each line, with no spaces or # comment after it, or "
                    "the lines after it never reach the script") if blank else ""
            self.error(f"unrecognized arguments: {shown}{hint or self._close_flags(extras)}")
        return parsed

    def _close_flags(self, extras: Sequence[str]) -> str:
        """"; did you mean --learning-rate?" for a mistyped flag close to one this script takes."""
        import difflib

        known = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
        guesses = []
        for arg in extras:
            if arg.startswith("--"):
                guesses += difflib.get_close_matches(arg.split("=", 1)[0], known, n=1, cutoff=0.7)
        return f"; did you mean {' or '.join(dict.fromkeys(guesses))}?" if guesses else ""

    def error(self, message: str) -> NoReturn:
        """One line, as every other bad input gets (argparse's own prints the whole usage first,
        27 lines for gpu_train.py, which hide the error); exit code 2."""
        self.exit(2, f"error: {message} (python {self.prog} --help lists every flag)\n")


EXAMPLES_SHOWN = 5


def examples_of(doc: str) -> list[str]:
    """The example commands of a script's docstring: the lines of its first indented block
    (the second paragraph) that run a program, spaces collapsed, at most EXAMPLES_SHOWN."""
    paragraphs = doc.strip("\n").split("\n\n")
    if len(paragraphs) < 2:
        return []
    lines = [" ".join(line.split()) for line in paragraphs[1].splitlines() if line.startswith("    ")]
    commands = [line for line in lines if line.split()[0] in {"python", "torchrun", "tensorboard"}]
    return commands[:EXAMPLES_SHOWN]


def new_parser(doc: str) -> argparse.ArgumentParser:
    """A script's parser: the first paragraph of `doc` (its docstring) as the description, and the
    example commands of the docstring at the end of --help."""
    examples = examples_of(doc)
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples) if examples else None
    parser = Parser(description=doc.strip("\n").split("\n\n")[0], epilog=epilog,
                    formatter_class=_HelpFormatter)
    parser.add_argument("--config", metavar="FILE.json",
                        help="JSON file of defaults (keys are flag names); the command line wins")
    return parser


def add_device_args(parser: argparse.ArgumentParser, amp_aliases: Sequence[str] = ()) -> None:
    """amp_aliases: other spellings of --amp in a guide (e.g. --mixed-precision)."""
    g = parser.add_argument_group("device and precision")
    g.add_argument("--device", default="auto",
                   help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps (default: auto)")
    g.add_argument("--gpu-id", type=int, default=None, help="index of the GPU to use")
    g.add_argument("--no-gpu", action="store_true", help="run on the CPU even if a GPU is present")
    g.add_argument("--amp", *amp_aliases, action="store_true",
                   help="mixed precision: float16 + GradScaler on CUDA (bfloat16 with --amp-dtype)")
    g.add_argument("--amp-dtype", choices=["float16", "bfloat16"], default=None,
                   help="autocast dtype for --amp (default float16; bfloat16 also enables AMP on CPU)")
    g.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader worker processes (default: auto, safe on Windows)")
    g.add_argument("--pin-memory", type=tristate, nargs="?", const=True, default="auto",
                   help="pin host memory for faster copies: auto (on with CUDA), true or false")
    g.add_argument("--gpu-memory-fraction", type=float, default=None,
                   help="cap this process's share of GPU memory (0-1], CUDA only")


def add_loading_args(target: argparse.ArgumentParser | argparse._ArgumentGroup, *, plain_state_dict: bool,
                     img_size: int | None | bool = False, num_classes_help: str | None = None) -> None:
    """The flags of every script that reads a model file, so that what the loading messages
    recommend exists wherever they can appear.

    plain_state_dict: the script can rebuild a plain state_dict (--arch, --num-classes);
    img_size: also --img-size for such files, with this default (None: no default; False: the
    script has its own --img-size or none). num_classes_help: the script's own meaning of
    --num-classes. target: a parser (the flags get a group of their own) or an existing group."""
    g = target.add_argument_group("files made elsewhere (a toolkit checkpoint records all of this)") \
        if isinstance(target, argparse.ArgumentParser) else target
    if plain_state_dict:
        g.add_argument("--arch", metavar="NAME",
                       help="architecture of a plain state_dict or a whole pickled model (names: "
                            "gpu_train.py --list-models)")
        g.add_argument("--num-classes", type=int, default=None, metavar="N",
                       help=num_classes_help or "number of classes of a plain state_dict")
        if img_size is not False:
            shown = "default: %(default)s" if img_size is not None else "224 when not given"
            g.add_argument("--img-size", type=int, default=img_size,
                           help=f"input size of a plain state_dict or a pickled model ({shown})")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a file that needs full pickle, e.g. a whole pickled model (unpickling "
                        "runs code from the file: only for files you trust)")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """Training-only speed and reproducibility switches."""
    g = parser.add_argument_group("speed and reproducibility")
    g.add_argument("--channels-last", type=tristate, nargs="?", const=True, default="auto",
                   help="channels_last memory format: auto (on for CUDA), true or false")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=42, help="random seed (default: %(default)s)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (slower; bit-exact resume on CPU)")


def add_training_args(parser: argparse.ArgumentParser, *, batch_size: int, epochs: int,
                      lr: float, short_flags: bool = False, patience: int | None = None) -> None:
    """short_flags: the U-Net guide's -b, -e and -l/--learning-rate as well.
    patience: on by default with this many epochs, also spelled --patience (fine-tuning guide)."""
    g = parser.add_argument_group("training")
    short = {"b": ["-b"], "e": ["-e"], "l": ["-l", "--learning-rate"]} if short_flags else {}
    g.add_argument(*short.get("b", []), "--batch-size", type=int, default=batch_size,
                   help="batch size per process (default: %(default)s)")
    g.add_argument(*short.get("e", []), "--epochs", type=int, default=epochs,
                   help="total number of epochs (default: %(default)s); with --resume, the new total")
    g.add_argument(*short.get("l", []), "--lr", type=float, default=lr, dest="lr",
                   help="learning rate (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="weight decay (default: %(default)s)")
    g.add_argument("--optimizer", choices=["adamw", "sgd", "adam"], default="adamw",
                   help="optimizer (default: %(default)s)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    g.add_argument("--amsgrad", action="store_true", help="AMSGrad variant of Adam/AdamW")
    g.add_argument("--scheduler", default="cosine",
                   choices=["cosine", "step", "warmrestart", "onecycle", "plateau", "none"],
                   help="learning-rate schedule (default: %(default)s)")
    g.add_argument("--warmup-epochs", type=float, default=0.0,
                   help="linear warm-up from lr/100 over this many epochs (default: %(default)s)")
    g.add_argument("--step-size", type=int, default=20, help="step: epochs between decays (%(default)s)")
    g.add_argument("--gamma", type=float, default=0.1, help="step/plateau: decay factor (%(default)s)")
    g.add_argument("--t0", type=int, default=10, help="warmrestart: epochs of the first cycle (%(default)s)")
    g.add_argument("--t-mult", type=int, default=2, help="warmrestart: cycle growth factor (%(default)s)")
    g.add_argument("--min-lr", type=float, default=0.0, help="floor of cosine schedules (%(default)s)")
    g.add_argument("--label-smoothing", type=float, default=0.0,
                   help="label smoothing of the cross-entropy loss (default: %(default)s)")
    g.add_argument("--clip-grad", type=float, default=None,
                   help="clip the gradient norm to this value (default: %(default)s)")
    g.add_argument("--accumulate-grad-batches", type=int, default=1,
                   help="micro-batches per optimizer step (default: %(default)s)")
    g.add_argument("--early-stopping-patience", *(["--patience"] if patience else []), type=int,
                   default=patience,
                   help="stop after this many epochs without improvement (default: %(default)s)")
    g.add_argument("--min-delta", type=float, default=0.0,
                   help="smallest change that counts as an improvement (default: %(default)s)")
    g.add_argument("--log-interval", type=int, default=20,
                   help="steps between progress-bar updates (the only host syncs; default: %(default)s)")
    g.add_argument("--nan-policy", choices=["stop", "skip"], default="stop",
                   help="a step whose loss or gradient is NaN or infinite: stop the run, keeping the last "
                        "good checkpoint (default), or skip that step's update")
    g.add_argument("--nan-max-skips", type=int, default=10,
                   help="with --nan-policy skip: stop once more steps than this were skipped "
                        "(default: %(default)s)")
    g.add_argument("--resume", metavar="CHECKPOINT",
                   help="continue the run saved in this checkpoint.pth (same output folder)")


def _dest_map(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in {"help", argparse.SUPPRESS}}


def given_on_command_line(parser: argparse.ArgumentParser,
                          argv: Sequence[str] | None) -> dict[str, Any]:
    """Parse argv and return only the values the user actually typed."""
    ns = argparse.Namespace(**{dest: _UNSET for dest in _dest_map(parser)})
    parser.parse_args(argv, ns)
    return {k: v for k, v in vars(ns).items() if v is not _UNSET}


# (flag, lowest, highest, lowest allowed itself, highest allowed itself); None: no bound
_RANGES = (("lr", 0.0, None, False, True), ("weight_decay", 0.0, None, True, True),
           ("label_smoothing", 0.0, 1.0, True, False), ("momentum", 0.0, 1.0, True, True),
           ("clip_grad", 0.0, None, False, True), ("warmup_epochs", 0.0, None, True, True),
           ("min_delta", 0.0, None, True, True), ("min_lr", 0.0, None, True, True),
           ("gamma", 0.0, None, False, True), ("mixup", 0.0, None, True, True),
           ("cutmix", 0.0, None, True, True), ("mix_prob", 0.0, 1.0, True, True),
           ("ema", 0.0, 1.0, False, False), ("nan_max_skips", 0, None, True, True),
           ("step_size", 0, None, False, True), ("t0", 0, None, False, True), ("t_mult", 1, None, True, True))


def check_same_architecture(args: argparse.Namespace, given: Iterable[str], ckpt: Mapping[str, Any],
                            source: str, keys: Sequence[str]) -> None:
    """A resumed run keeps the model it was trained with: a shape flag typed again with another
    value is one line (not the long list of tensors that then do not fit)."""
    saved = ckpt.get("config") or {}
    for key in keys:
        if key in given and key in saved and getattr(args, key) != saved[key]:
            flag = f"--{key.replace('_', '-')}"
            raise UserError(f"{flag} {getattr(args, key)} contradicts {source}, trained with {flag} "
                            f"{saved[key]}; a resumed run keeps its model: drop {flag}, or train the "
                            "other model as a new run (without --resume)")


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Whole-number flags that must be 1 or more (batch sizes, epochs, widths), one line each."""
    for name in names:
        value = getattr(args, name)
        if value is None or value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be 1 or more, got {value}")


def check_training_values(args: argparse.Namespace) -> None:
    """Numbers a training run cannot use, refused before any work: NaN and infinity anywhere, and
    values outside the flag's range (a negative --clip-grad would reverse the gradients)."""
    for name, low, high, low_ok, high_ok in _RANGES:
        value = getattr(args, name, None)
        if value is None:
            continue
        flag = f"--{name.replace('_', '-')}"
        below = value < low or (value == low and not low_ok) if low is not None else False
        above = value > high or (value == high and not high_ok) if high is not None else False
        if not math.isfinite(value) or below or above:
            lo = "" if low is None else f"{'>=' if low_ok else '>'} {low:g}"
            hi = "" if high is None else f"{'<=' if high_ok else '<'} {high:g}"
            raise UserError(f"{flag} must be a number {' and '.join(p for p in (lo, hi) if p)}, got {value}")


def parse_early(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> None:
    """Answer --help and reject a mistyped flag before a script imports torch (seconds)."""
    given_on_command_line(parser, argv)


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A --config file's JSON object; a missing file, bad JSON or another type is one clear line."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file {file} does not exist; pass a JSON file of flag values")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"config file {file} is not valid JSON ({exc}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"config file {file} must hold a JSON object of flag values")
    return raw


def read_config_file(path: str | os.PathLike, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Load --config JSON; keys may use dashes or underscores; unknown keys are an error."""
    return coerce_values(read_json_object(path), parser, source=f"config file {Path(path)}")


def coerce_values(raw: Mapping[str, Any], parser: argparse.ArgumentParser, *,
                  source: str) -> dict[str, Any]:
    actions = _dest_map(parser)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        dest = key.lstrip("-").replace("-", "_")
        if dest == "trust_checkpoint" and dest in actions:
            raise UserError(f"{source}: {key!r} cannot be set here: unpickling a file can run code, so "
                            "trust is given on the command line (--trust-checkpoint), each time")
        if dest not in actions or dest in NOT_IN_CONFIG:
            import difflib

            known = sorted(d for d in actions if d not in NOT_IN_CONFIG)
            close = difflib.get_close_matches(dest, known, n=1, cutoff=0.7)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(known)}"
            raise UserError(f"{source}: unknown key {key!r}; {hint}")
        action = actions[dest]
        value = _typed(action, value, f"{source}: {key!r}")
        if action.choices is not None and value is not None and value not in action.choices:
            raise UserError(f"{source}: {key!r} must be one of {', '.join(map(str, action.choices))}")
        values[dest] = value
    return values


def resolve(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
            layers: Iterable[Mapping[str, Any]] = (),
            read_config: Callable[[str, argparse.ArgumentParser], dict[str, Any]] | None = None,
            base: Mapping[str, Any] | None = None) -> tuple[argparse.Namespace, set[str]]:
    """Resolve the config: defaults < base (a --recipe) < --config < layers < command line.

    Returns the namespace and the set of keys the user typed on the command line.
    read_config: how the script reads --config (default: flag names as keys).
    """
    given = given_on_command_line(parser, argv)
    values = {dest: action.default for dest, action in _dest_map(parser).items()}
    values.update(base or {})
    if given.get("config"):
        values.update((read_config or read_config_file)(given["config"], parser))
    for layer in layers:
        values.update(layer)
    values.update(given)
    return argparse.Namespace(**values), set(given)


def _typed(action: argparse.Action, value: Any, where: str) -> Any:
    """A JSON value checked and converted as the flag's own parser would."""
    if value is None:
        return None
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false (JSON), got {value!r}")
        return value
    kind = action.type
    try:
        if isinstance(value, str):
            return kind(value) if kind is not None else value
        if kind is int and (isinstance(value, bool) or not float(value).is_integer()):
            raise ValueError(f"expected a whole number, got {value!r}")
        if kind in (int, float) and isinstance(value, int | float) and not isinstance(value, bool):
            return kind(value)
        if kind is tristate and isinstance(value, bool):
            return value
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        raise UserError(f"{where}: bad value ({exc})") from None
    if kind is None and isinstance(value, str):
        return value
    raise UserError(f"{where}: bad value {value!r} ({type(value).__name__})")


def inheritable(config: Mapping[str, Any], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The part of a saved config that a resumed run takes over (known keys only)."""
    actions = _dest_map(parser)
    # the start weights (-f/--load, --weights) are in the checkpoint: a resume never reopens that file
    skip = PER_INVOCATION | MACHINE_KEYS | {"load", "weights"}
    return {k: v for k, v in config.items() if k in actions and k not in skip}


def write_config(args: argparse.Namespace, path: str | os.PathLike) -> None:
    """config.json: the resolved settings, usable again as --config."""
    payload = {k: v for k, v in sorted(vars(args).items()) if _is_plain(v) and k not in NOT_IN_CONFIG}
    Path(path).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def plain_config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if _is_plain(v)}


def _is_plain(value: Any) -> bool:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return False
