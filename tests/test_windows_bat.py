"""gpu_train.bat, checked statically (no Windows here): line endings, the Python it finds,
the install step, the guide's default command, argument pass-through, exit code and pause,
and that every jump lands on a label."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import gpu_train
from common.classify import resolve_args

BAT = Path(__file__).resolve().parents[1] / "gpu_train.bat"
VENV_PY = r".venv\Scripts\python.exe"
# The guide's quick-start command (gpu_train.bat runs it when given no arguments).
GUIDE_DEFAULTS = ["--data-dir", "./dataset", "--model", "efficientnet_b0", "--num-classes", "2",
                  "--batch-size", "32", "--epochs", "50", "--amp"]


@pytest.fixture(scope="module")
def raw() -> bytes:
    return BAT.read_bytes()


@pytest.fixture(scope="module")
def lines(raw) -> list[str]:
    return raw.decode("ascii").split("\r\n")


@pytest.fixture(scope="module")
def variables(lines) -> dict[str, str]:
    """NAME -> value for the variables set once, on a line of their own (the constants)."""
    found = {}
    for line in lines:
        match = re.fullmatch(r'\s*set "(\w+)=(.*)"\s*', line, flags=re.IGNORECASE)
        if match:
            found[match.group(1).upper()] = match.group(2)
    text = "\n".join(lines).upper()
    return {k: v for k, v in found.items() if text.count(f'SET "{k}=') == 1}


def expand(line: str, variables: dict[str, str]) -> str:
    """Replace %NAME% by its `set` value (what cmd does at run time), leaving %* and %~1 alone."""
    return re.sub(r"%(\w+)%", lambda m: variables.get(m.group(1).upper(), m.group(0)), line)


def is_code(line: str) -> bool:
    text = line.strip().lower()
    return bool(text) and not text.startswith(("rem ", "::")) and text != "rem"


def label_of(line: str) -> str | None:
    text = line.strip()
    if text.startswith(":") and not text.startswith("::"):
        return text[1:].split()[0].lower()
    return None


def labels(lines) -> dict[str, int]:
    return {name: i for i, line in enumerate(lines) if (name := label_of(line))}


def next_command(lines, index: int, skip_echo: bool = False) -> tuple[int, str]:
    """The command cmd runs after line `index`: skip blanks, comments and labels (and echo
    lines with skip_echo); follow goto."""
    where = labels(lines)
    i = index + 1
    for _ in range(len(lines)):
        text = lines[i].strip()
        target = re.fullmatch(r"goto :?(\w+)", text, flags=re.IGNORECASE)
        if target:
            i = where[target.group(1).lower()] + 1
        elif not is_code(text) or label_of(text) or (skip_echo and text.lower().startswith("echo")):
            i += 1
        else:
            return i, text
    raise AssertionError(f"no command after line {index + 1}")


def run_line(lines, variables, args: str) -> int:
    """Index of the line that runs `<venv python> gpu_train.py <args>` (after expansion)."""
    wanted = f'"{VENV_PY}" gpu_train.py {args}'
    hits = [i for i, line in enumerate(lines) if expand(line, variables).strip() == wanted]
    assert len(hits) == 1, f"expected one line running {wanted!r}, found {len(hits)}"
    return hits[0]


def test_crlf_line_endings_and_ascii(raw):
    assert raw.endswith(b"\r\n"), "the last line must end with CRLF"
    assert raw.count(b"\n") == raw.count(b"\r\n"), "a line ends with a bare LF"
    assert raw.count(b"\r") == raw.count(b"\r\n"), "a bare CR in the file"
    assert raw.isascii(), "non-ASCII text is garbled by cmd's code page"


def test_header_echo_off_setlocal_and_own_folder(lines):
    code = [line.strip() for line in lines if is_code(line)]
    assert code[0].lower() == "@echo off"
    assert code[1].lower() == "setlocal"
    assert code[2] == 'cd /d "%~dp0"', "must run from the script's folder (double-click)"


def test_prefers_the_venv_then_py_launcher_then_python(lines, variables):
    assert variables["VENV_PY"] == VENV_PY
    text = [expand(line, variables) for line in lines]
    first = {key: next(i for i, line in enumerate(text) if pattern.search(line))
             for key, pattern in {
                 "venv": re.compile(rf'^if exist "{re.escape(VENV_PY)}" goto', re.I),
                 "py": re.compile(r"^py -3 -c ", re.I),
                 "python": re.compile(r"^python -c ", re.I)}.items()}
    assert first["venv"] < first["py"] < first["python"]
    for key in ("py", "python"):  # the probe must ask for 3.10+, not just any Python
        assert "sys.version_info >= (3, 10)" in text[first[key]]


def block_after(lines, label: str) -> list[str]:
    """The lines of a label's section, up to its first `exit /b`."""
    start = labels(lines)[label.lower()]
    block = []
    for line in lines[start + 1:]:
        block.append(line.strip())
        if line.strip().lower().startswith("exit /b"):
            return block
    raise AssertionError(f":{label} never exits")


def test_missing_python_says_what_to_install_pauses_and_fails(lines):
    after_call = next(i for i, line in enumerate(lines) if "call :find_python" in line)
    assert lines[after_call + 1].strip().lower() == "if errorlevel 1 goto no_python"
    block = block_after(lines, "no_python")
    message = " ".join(line for line in block if line.lower().startswith("echo"))
    assert "Python 3.10" in message
    assert "python.org" in message
    assert "Add python.exe to PATH" in message
    assert block[-2:] == ["pause", "exit /b 1"]


def test_creates_venv_and_installs_requirements_with_a_marker(lines, variables):
    text = [expand(line, variables).strip() for line in lines]
    venv = next(i for i, line in enumerate(text) if line.endswith("-m venv .venv"))
    assert text[venv].startswith("%PY_CMD% "), "the venv must be made by the Python just found"
    install = text.index(f'"{VENV_PY}" -m pip install -r requirements.txt')
    assert text[install + 1].lower() == "if errorlevel 1 goto install_failed"
    marker = next(i for i, line in enumerate(text) if re.search(r"\.venv\\\.installed\"? >nul$", line))
    assert text[marker].lower().startswith("copy /y requirements.txt"), "marker made after install"
    assert install < marker
    # The install runs when the marker is missing or differs from requirements.txt.
    assert r'if not exist ".venv\.installed" goto install' in text
    assert r'fc /b requirements.txt ".venv\.installed" >nul 2>&1' in text
    block = block_after(lines, "install_failed")
    assert any("failed" in line.lower() for line in block if line.lower().startswith("echo"))
    assert block[-2:] == ["pause", "exit /b 1"]


def test_no_arguments_run_the_guide_defaults(lines, variables):
    index = run_line(lines, variables, " ".join(GUIDE_DEFAULTS))
    branch = next(i for i, line in enumerate(lines) if line.strip().startswith('if "%~1"==""'))
    target = re.search(r"goto (\w+)$", lines[branch].strip()).group(1)
    assert next_command(lines, labels(lines)[target.lower()], skip_echo=True)[0] == index
    args, _ = resolve_args(gpu_train.build_parser(), shlex.split(
        expand(lines[index], variables).split("gpu_train.py", 1)[1]))
    assert (args.data_dir, args.model, args.num_classes) == ("./dataset", "efficientnet_b0", 2)
    assert (args.batch_size, args.epochs, args.amp) == (32, 50, True)


def test_arguments_pass_through_unchanged(lines, variables):
    index = run_line(lines, variables, "%*")
    branch = next(i for i, line in enumerate(lines) if line.strip().startswith('if "%~1"==""'))
    assert next_command(lines, branch, skip_echo=True)[0] == index, "with arguments, %* runs next"


def test_exit_code_is_reported_then_pause_then_exit(lines, variables):
    for args in (" ".join(GUIDE_DEFAULTS), "%*"):
        index = run_line(lines, variables, args)
        assert next_command(lines, index)[1] == 'set "CODE=%ERRORLEVEL%"', args
    text = "\n".join(lines)
    assert "echo training finished, outputs in ./output" in text
    assert ("echo training FAILED (exit code %CODE%) - see the message above and "
            r"output\training.log") in text
    outcomes = [i for i, line in enumerate(lines)
                if line.strip().startswith(("echo training finished", "echo training FAILED"))]
    assert len(outcomes) >= 2
    for index in outcomes:  # every outcome keeps the window open, then returns the code
        pause, _ = next_command(lines, index)
        assert lines[pause].strip() == "pause", lines[index]
        assert next_command(lines, pause)[1] == "exit /b %CODE%", lines[index]

def test_every_goto_and_call_target_exists(lines):
    where = labels(lines)
    assert len(where) == sum(1 for line in lines if label_of(line)), "a label is defined twice"
    targets = []
    for line in lines:
        if not is_code(line):
            continue
        targets += re.findall(r"\bgoto\s+:?(\w+)", line, flags=re.IGNORECASE)
        targets += re.findall(r"\bcall\s+:(\w+)", line, flags=re.IGNORECASE)
    assert targets, "expected jumps in the script"
    missing = sorted({t for t in targets if t.lower() != "eof" and t.lower() not in where})
    assert not missing, f"goto/call targets without a label: {missing}"


def test_subroutines_are_not_entered_by_falling_through(lines):
    called = set(re.findall(r"\bcall\s+:(\w+)", "\n".join(lines), flags=re.IGNORECASE))
    assert called
    for name in called:
        before = [line.strip().lower() for line in lines[:labels(lines)[name.lower()]] if is_code(line)]
        assert before[-1].startswith(("exit /b", "goto ")), f":{name} is reached by falling through"


def test_no_unescaped_parentheses_in_echo_inside_blocks(lines):
    """An unescaped ) in an echo inside an if ( ... ) block ends the block early in cmd."""
    depth = 0
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not is_code(text):
            continue
        if depth and text.lower().startswith("echo"):
            bare = re.sub(r"\^[()]", "", text)
            assert "(" not in bare and ")" not in bare, f"line {number}: escape ( ) as ^( ^)"
        depth += text.endswith("(") - (text.startswith(")") and depth > 0)
    assert depth == 0, "unbalanced ( ... ) block"
