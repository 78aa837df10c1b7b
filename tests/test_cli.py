"""common/cli.py: layered configuration, tristate flags, config files and config.json."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from common import cli
from common.errors import UserError


def make_parser() -> argparse.ArgumentParser:
    parser = cli.new_parser("test")
    cli.add_device_args(parser)
    cli.add_runtime_args(parser)
    cli.add_training_args(parser, batch_size=32, epochs=10, lr=0.001)
    parser.add_argument("--demo", action="store_true")
    return parser


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_defaults_when_nothing_given():
    args, given = cli.resolve(make_parser(), [])
    assert args.batch_size == 32
    assert args.epochs == 10
    assert args.lr == 0.001
    assert args.pin_memory == "auto"
    assert args.channels_last == "auto"
    assert given == set()


def test_precedence_defaults_config_layers_argv(tmp_path):
    config = write_json(tmp_path / "c.json", {"batch_size": 64, "epochs": 3, "lr": 0.5,
                                              "weight_decay": 0.2})
    layer = {"epochs": 7, "lr": 0.25}
    args, given = cli.resolve(make_parser(), ["--config", str(config), "--lr", "0.125"],
                              layers=[layer])
    assert args.momentum == 0.9          # default: nobody set it
    assert args.batch_size == 64         # config beats default
    assert args.weight_decay == 0.2      # config beats default
    assert args.epochs == 7              # layer beats config
    assert args.lr == 0.125              # argv beats layer and config
    assert given == {"config", "lr"}


def test_later_layers_win_over_earlier_ones():
    args, _ = cli.resolve(make_parser(), [], layers=[{"epochs": 2}, {"epochs": 5}])
    assert args.epochs == 5


def test_config_keys_with_dashes_underscores_and_leading_dashes(tmp_path):
    config = write_json(tmp_path / "c.json", {"batch-size": 16, "weight_decay": 0.3,
                                              "--min-lr": 0.001})
    args, _ = cli.resolve(make_parser(), ["--config", str(config)])
    assert args.batch_size == 16
    assert args.weight_decay == 0.3
    assert args.min_lr == 0.001


def test_config_string_values_are_converted_with_the_flag_type(tmp_path):
    config = write_json(tmp_path / "c.json", {"batch_size": "12", "pin_memory": "False",
                                              "channels-last": "yes"})
    args, _ = cli.resolve(make_parser(), ["--config", str(config)])
    assert args.batch_size == 12
    assert args.pin_memory is False
    assert args.channels_last is True


def test_unknown_config_key_lists_valid_keys(tmp_path):
    config = write_json(tmp_path / "c.json", {"bsz": 16})
    with pytest.raises(UserError) as info:
        cli.resolve(make_parser(), ["--config", str(config)])
    message = str(info.value)
    assert "'bsz'" in message
    assert str(config) in message
    assert "batch_size" in message and "weight_decay" in message  # the valid keys are listed
    assert "resume" not in message.split("valid keys:")[1]  # per-invocation keys are not offered


def test_a_mistyped_config_key_names_the_key_meant(tmp_path):
    config = write_json(tmp_path / "c.json", {"batchsize": 16})
    with pytest.raises(UserError) as info:
        cli.resolve(make_parser(), ["--config", str(config)])
    assert str(info.value) == f"config file {config}: unknown key 'batchsize'; did you mean 'batch_size'?"


@pytest.mark.parametrize("key", ["resume", "config"])
def test_per_invocation_keys_are_refused_in_config(tmp_path, key):
    config = write_json(tmp_path / "c.json", {key: "x"})
    with pytest.raises(UserError, match="unknown key"):
        cli.resolve(make_parser(), ["--config", str(config)])


def loading_parser() -> argparse.ArgumentParser:
    parser = make_parser()
    cli.add_loading_args(parser, plain_state_dict=False)
    return parser


@pytest.mark.parametrize("key", ["trust_checkpoint", "trust-checkpoint"])
def test_trust_is_never_taken_from_a_config_file(tmp_path, key):
    """A --config (someone else's, or an old config.json) must not switch on unpickling."""
    config = write_json(tmp_path / "c.json", {key: True})
    with pytest.raises(UserError) as info:
        cli.resolve(loading_parser(), ["--config", str(config)])
    assert str(config) in str(info.value) and "--trust-checkpoint" in str(info.value)
    args, _ = cli.resolve(loading_parser(), ["--trust-checkpoint"])
    assert args.trust_checkpoint is True


def test_trust_is_neither_written_to_config_json_nor_inherited_on_resume(tmp_path):
    parser = loading_parser()
    args, _ = cli.resolve(parser, ["--trust-checkpoint", "--lr", "0.2"])
    path = tmp_path / "config.json"
    cli.write_config(args, path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert "trust_checkpoint" not in data and data["lr"] == 0.2
    assert "trust_checkpoint" not in cli.inheritable({**data, "trust_checkpoint": True}, parser)


def test_invalid_json_names_the_file(tmp_path):
    config = tmp_path / "broken.json"
    config.write_text('{"lr": 0.1,', encoding="utf-8")
    with pytest.raises(UserError) as info:
        cli.resolve(make_parser(), ["--config", str(config)])
    assert str(config) in str(info.value)
    assert "JSON" in str(info.value)


def test_missing_config_file_names_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(UserError, match="nope.json"):
        cli.resolve(make_parser(), ["--config", str(missing)])


def test_config_must_be_an_object(tmp_path):
    config = write_json(tmp_path / "list.json", [1, 2])
    with pytest.raises(UserError, match="JSON object"):
        cli.resolve(make_parser(), ["--config", str(config)])


def test_config_bad_value_and_bad_choice(tmp_path):
    bad_int = write_json(tmp_path / "a.json", {"batch_size": "many"})
    with pytest.raises(UserError, match="batch_size"):
        cli.resolve(make_parser(), ["--config", str(bad_int)])
    bad_choice = write_json(tmp_path / "b.json", {"optimizer": "lion"})
    with pytest.raises(UserError) as info:
        cli.resolve(make_parser(), ["--config", str(bad_choice)])
    assert "adamw" in str(info.value) and "sgd" in str(info.value)


@pytest.mark.parametrize("argv, expected", [
    (["--pin-memory", "True"], True),
    (["--pin-memory"], True),
    (["--pin-memory", "false"], False),
    (["--pin-memory", "0"], False),
    (["--pin-memory", "yes"], True),
    (["--pin-memory", "auto"], "auto"),
    ([], "auto"),
])
def test_pin_memory_tristate(argv, expected):
    args, _ = cli.resolve(make_parser(), argv)
    assert args.pin_memory == expected
    assert type(args.pin_memory) is type(expected)


def test_tristate_rejects_garbage(capsys):
    with pytest.raises(argparse.ArgumentTypeError, match="expected auto, true or false, got 'maybe'"):
        cli.tristate("maybe")
    with pytest.raises(SystemExit) as exc:
        make_parser().parse_args(["--pin-memory", "maybe"])
    assert exc.value.code == 2  # argparse's usage error
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: argument --pin-memory: expected auto, true or false, got 'maybe' "
                                f"(python {make_parser().prog} --help lists every flag)"]


def test_help_exits_0_with_the_usage_on_stdout(capsys):
    with pytest.raises(SystemExit) as exc:
        make_parser().parse_args(["--help"])
    assert exc.value.code == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: ")
    assert "--pin-memory" in captured.out and "--no-gpu" in captured.out
    assert captured.err == ""


def test_given_on_command_line_returns_only_typed_flags():
    given = cli.given_on_command_line(make_parser(), ["--lr", "0.1", "--no-gpu", "--epochs", "10"])
    # --epochs equals its default but was typed, so it counts; nothing else does
    assert given == {"lr": 0.1, "no_gpu": True, "epochs": 10}


def test_inheritable_drops_machine_and_per_invocation_keys():
    parser = make_parser()
    saved = {"lr": 0.1, "epochs": 4, "optimizer": "sgd", "device": "cuda", "gpu_id": 1,
             "no_gpu": True, "num_workers": 8, "pin_memory": True, "gpu_memory_fraction": 0.5,
             "config": "c.json", "resume": "x.pth", "demo": True, "not_a_flag": 3}
    assert cli.inheritable(saved, parser) == {"lr": 0.1, "epochs": 4, "optimizer": "sgd"}


def test_write_config_writes_plain_json(tmp_path):
    args, _ = cli.resolve(make_parser(), ["--lr", "0.2", "--pin-memory", "false"])
    args.not_plain = object()
    args.a_list = [1, "two", 3.0]
    path = tmp_path / "config.json"
    cli.write_config(args, path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["lr"] == 0.2
    assert data["pin_memory"] is False
    assert data["batch_size"] == 32
    assert data["a_list"] == [1, "two", 3.0]
    assert "not_plain" not in data
    assert "config" not in data and "resume" not in data  # per-invocation keys stay out
    assert list(data) == sorted(data)


def test_written_config_can_be_passed_back_as_config(tmp_path):
    parser = make_parser()
    args, _ = cli.resolve(parser, ["--lr", "0.3", "--epochs", "2", "--optimizer", "sgd", "--amp",
                                   "--pin-memory", "--gpu-id", "1", "--clip-grad", "1"])
    path = tmp_path / "config.json"
    cli.write_config(args, path)
    again, given = cli.resolve(make_parser(), ["--config", str(path)])
    assert given == {"config"}
    expected = {k: v for k, v in vars(args).items() if k != "config"}
    assert {k: v for k, v in vars(again).items() if k != "config"} == expected


@pytest.mark.parametrize("text", ["false", "False", "true"])
def test_config_switch_written_as_a_string_is_never_silently_true(tmp_path, text):
    """{"amp": "false"} must not turn AMP on (a non-empty string is truthy): it is refused
    with a message that asks for a JSON true/false."""
    config = write_json(tmp_path / "c.json", {"amp": text})
    with pytest.raises(UserError) as info:
        cli.resolve(make_parser(), ["--config", str(config)])
    assert "'amp'" in str(info.value) and "true or false" in str(info.value)


def test_config_switch_with_a_json_bool(tmp_path):
    config = write_json(tmp_path / "c.json", {"amp": True, "deterministic": False})
    args, _ = cli.resolve(make_parser(), ["--config", str(config)])
    assert args.amp is True and args.deterministic is False


@pytest.mark.parametrize("key, value", [("epochs", 2.5), ("batch_size", True), ("amp", "maybe")])
def test_config_value_of_the_wrong_type_is_a_user_error(tmp_path, key, value):
    config = write_json(tmp_path / "c.json", {key: value})
    with pytest.raises(UserError) as info:
        cli.resolve(make_parser(), ["--config", str(config)])
    assert repr(key) in str(info.value) and str(config) in str(info.value)


def test_config_numbers_that_fit(tmp_path):
    config = write_json(tmp_path / "c.json", {"lr": 1, "epochs": 4, "gpu_id": None,
                                              "clip_grad": 2})
    args, _ = cli.resolve(make_parser(), ["--config", str(config)])
    assert args.lr == 1.0
    assert args.epochs == 4 and args.gpu_id is None
    assert args.clip_grad == 2.0


def test_a_resumed_run_keeps_its_architecture_flags():
    ckpt = {"config": {"width": 8, "bilinear": False, "lr": 0.1}}
    same = argparse.Namespace(width=8, bilinear=False, lr=0.5)
    cli.check_same_architecture(same, {"width", "lr"}, ckpt, "c.pth", ("width", "bilinear"))  # typed, equal
    other = argparse.Namespace(width=16, bilinear=True, lr=0.1)
    cli.check_same_architecture(other, set(), ckpt, "c.pth", ("width", "bilinear"))  # not typed: fine
    with pytest.raises(UserError, match=r"^--bilinear True contradicts c.pth, trained with --bilinear False"):
        cli.check_same_architecture(other, {"bilinear"}, ckpt, "c.pth", ("width", "bilinear"))
