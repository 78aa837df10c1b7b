"""What `--help` says is what a run does: every default a help line states equals the value the
script resolves when the flag is not given, every script ends its help with example commands
that parse, and an "unrecognized arguments" error names blank arguments."""
from __future__ import annotations

import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest

from common import cli

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SCRIPTS = ("gpu_train", "multi_gpu_train", "finetune_gpu", "train_unet", "run_behavior_classification",
           "validate", "predict", "export_onnx", "test_model")
# The least each script needs on its command line to resolve its configuration.
REQUIRED = {"validate": ["--model", "m.pth", "--data-dir", "d"], "predict": ["-m", "m.pth", "-i", "x.png"],
            "export_onnx": ["--model", "m.pth"]}
STATED = re.compile(r"\bdefault: ([^();,]+)|\(([-+\d.e]+)\)$")
NONE_WORDS = {"off", "none", "auto"}


def parser_of(script: str):
    return importlib.import_module(script).build_parser()


def stated_defaults(parser) -> list[tuple[str, str]]:
    """(dest, text) for every help line that states a default as a literal value."""
    formatter = parser._get_formatter()
    found = []
    for action in parser._actions:
        if not action.help or action.dest == "help":
            continue
        text = " ".join(formatter._expand_help(action).split())
        for match in STATED.finditer(text):
            found.append((action.dest, (match.group(1) or match.group(2)).strip()))
    return found


def agrees(text: str, value) -> bool:
    """Whether a help text's default is the value; descriptions in words ("the model's") are not
    literal values and are not judged here."""
    if isinstance(value, bool) and text.lower() in {"true", "false", "on", "off"}:
        return value == (text.lower() in {"true", "on"})
    try:
        number = float(text)
    except ValueError:
        if value is None:
            return text in NONE_WORDS or not text.replace("_", "").replace("-", "").isalnum()
        if isinstance(value, str):
            return text == value or " " in text
        if isinstance(value, list):
            return text == " ".join(map(str, value))
        return " " in text or text in NONE_WORDS
    return value is not None and not isinstance(value, bool) and float(value) == number


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_defaults_are_the_resolved_defaults(script):
    parser = parser_of(script)
    resolved, _ = cli.resolve(parser, REQUIRED.get(script, []))
    stated = stated_defaults(parser)
    assert len(stated) >= 3, f"{script}: too few defaults found in --help; the pattern no longer matches"
    wrong = [f"--{dest.replace('_', '-')}: help says {text!r}, the run uses {getattr(resolved, dest)!r}"
             for dest, text in stated if not agrees(text, getattr(resolved, dest))]
    assert not wrong, f"{script}: " + "; ".join(wrong)


def test_the_unet_defaults_are_the_guides():
    """train_unet.py sets its own early stopping, min-delta and weight decay: --help says so."""
    found = dict(stated_defaults(parser_of("train_unet")))
    shown = (found["early_stopping_patience"], found["min_delta"], found["weight_decay"])
    assert shown == ("10", "0.001", "1e-08")


def test_a_wrong_stated_default_is_caught():
    parser = cli.new_parser("t")
    parser.add_argument("--alpha", type=float, default=0.5, help="alpha (default: 0.25)")
    parser.add_argument("--beta", type=int, default=None, help="beta (default: 3)")
    resolved, _ = cli.resolve(parser, [])
    assert [agrees(text, getattr(resolved, dest)) for dest, text in stated_defaults(parser)] == [False, False]


def test_a_default_set_later_shows_in_help():
    parser = cli.new_parser("t")
    parser.add_argument("--gamma", type=float, default=0.0, help="gamma (default: %(default)s)")
    parser.add_argument("--delta", type=int, default=None, help="delta (default: %(default)s)")
    parser.set_defaults(gamma=0.75)
    text = " ".join(parser.format_help().split())
    assert "gamma (default: 0.75)" in text and "delta (default: off)" in text


def example_lines(help_text: str) -> list[str]:
    assert "\nexamples:\n" in help_text
    tail = help_text.rsplit("\nexamples:\n", 1)[1]
    return [line.strip() for line in tail.splitlines() if line.strip()]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_ends_with_examples_that_parse(script):
    parser = parser_of(script)
    examples = example_lines(parser.format_help())
    assert 3 <= len(examples) <= 5, examples
    for line in examples:
        words = shlex.split(line, comments=True)
        assert f"{script}.py" in words, line
        args = words[words.index(f"{script}.py") + 1:]
        try:
            parser_of(script).parse_args(args)
        except SystemExit as exc:
            pytest.fail(f"{script} --help example does not parse (exit {exc.code}): {line}")


def test_examples_of_takes_the_commands_of_the_docstring():
    doc = ("Title.\n\n    python a.py --x 1   # one\n    note\n    torchrun b.py\n\n"
           "More text.\n    python c.py")
    assert cli.examples_of(doc) == ["python a.py --x 1 # one", "torchrun b.py"]
    assert cli.examples_of("Title only.") == []


def test_blank_arguments_are_named(capsys):
    parser = parser_of("gpu_train")
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--data-dir", "./dataset", " ", "--amp"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: ' '" in err and "1 of them blank" in err and "backslash" in err


def test_other_unrecognized_arguments_keep_the_plain_message(capsys):
    with pytest.raises(SystemExit) as exc:
        parser_of("gpu_train").parse_args(["stray"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: stray" in err and "blank" not in err and "did you mean" not in err


@pytest.mark.parametrize("script, argv, unknown, meant", [
    ("gpu_train", ["--data-dri", "x"], "--data-dri x", "--data-dir"),
    ("gpu_train", ["--lable-smoothing=0.1"], "--lable-smoothing=0.1", "--label-smoothing"),
    ("train_unet", ["--validaton", "10"], "--validaton 10", "--validation"),
    ("predict", ["-m", "a.pth", "-i", "b.png", "--mask-treshold", "0.4"], "--mask-treshold 0.4",
     "--mask-threshold"),
])
def test_a_mistyped_flag_is_one_line_that_names_the_flag_meant(capsys, script, argv, unknown, meant):
    with pytest.raises(SystemExit) as exc:
        parser_of(script).parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: unrecognized arguments: {unknown}; did you mean {meant}? "
                   f"(python {parser_of(script).prog} --help lists every flag)"], err


def test_a_bad_value_is_one_line_without_the_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        parser_of("gpu_train").parse_args(["--lr", "x"])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"error: argument --lr: invalid float value: 'x' (python {parser_of('gpu_train').prog} --help "
        "lists every flag)"]
    assert captured.out == ""
