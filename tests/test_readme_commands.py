"""Every command of README.md and README.zh-CN.md that runs one of this project's scripts parses with
that script's own parser, and the two READMEs map the same guide commands to the same project
commands ("Your guide says -> run this").

Commands are taken from the fenced code blocks (any language but python/json) and from the project
column of the mapping table. A command is `python X.py ...`, `python -m torch.distributed.run ...
X.py ...`, `torchrun ... X.py ...`, `.venv/bin/python X.py ...` (any python path) or
`gpu_train.bat ...` (which hands its arguments to gpu_train.py), possibly continued over several
lines with a trailing backslash; `# comments`, shell redirections and anything after `|`, `&&` or
`;` are dropped. The parsers run with abbreviations off: a README flag must be spelt in full."""
from __future__ import annotations

import importlib
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = ("README.md", "README.zh-CN.md")
SCRIPTS = frozenset({"gpu_train.py", "multi_gpu_train.py", "finetune_gpu.py", "test_model.py",
                     "validate.py", "predict.py", "export_onnx.py", "train_unet.py",
                     "run_behavior_classification.py"})
NOT_COMMANDS = frozenset({"python", "py", "json", "jsonc"})  # code-block languages that hold no commands
FENCE = re.compile(r"^(\s*)(```+)\s*([\w+-]*)")
TABLE_START, TABLE_END = "<!-- guide-map:start -->", "<!-- guide-map:end -->"
GUIDES = ("000", "001", "002", "003", "004")
# `2>&1`, `> log.txt`, `>> log`, `< in`, `&> all` (outside quotes; none of our arguments holds one)
REDIRECT = re.compile(r"(?<!\S)\d*(?:&>|>>|>|<)&?\s*\S+")
STOP = frozenset({"|", "||", "&&", ";", "&"})
PROGRAMS = ("python", "python3", "py", "torchrun", "gpu_train.bat", "tensorboard", "make", "pip",
            "nvidia-smi", ".venv")


def code_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(line number of the first line, lines) of each fenced block whose language may hold commands.
    Fences may be indented (a block inside a list item); the block's lines lose that indent."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3).lower()
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            line = lines[j]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            j += 1
        if lang not in NOT_COMMANDS:
            blocks.append((i + 2, body))
        i = j + 1
    return blocks


def logical_lines(first: int, lines: list[str]) -> list[tuple[int, str]]:
    """Join the lines continued with a trailing backslash; (line number, joined line)."""
    out, buf, start = [], [], first
    for n, line in enumerate(lines, first):
        if not buf:
            start = n
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            buf.append(stripped[:-1])
            continue
        buf.append(stripped)
        out.append((start, " ".join(part.strip() for part in buf)))
        buf = []
    if buf:
        out.append((start, " ".join(part.strip() for part in buf)))
    return out


def words(line: str) -> list[str]:
    """The words of one shell command line: comments, redirections and what follows |, &&, ; dropped."""
    lexer = shlex.shlex(REDIRECT.sub(" ", line), posix=True, punctuation_chars="|&;")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    lexer.escape = ""  # a backslash is literal (Windows paths); continuations are already joined
    out = []
    for token in lexer:
        if token in STOP:
            break
        out.append(token)
    return out


def is_python(word: str) -> bool:
    name = re.split(r"[\\/]", word)[-1].lower()
    return re.fullmatch(r"python(\d+(\.\d+)*)?(\.exe)?|py(\.exe)?", name) is not None


def script_call(argv: list[str]) -> tuple[str, list[str]] | None:
    """(script file name, its arguments) when argv runs a .py file or gpu_train.bat; else None."""
    argv = list(argv)
    if argv and argv[0] in {"$", ">", "PS>"}:  # a shell prompt
        argv = argv[1:]
    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):  # VAR=value before it
        argv = argv[1:]
    if not argv:
        return None
    head = re.split(r"[\\/]", argv[0])[-1].lower()
    if head in {"gpu_train.bat", "gpu_train"}:
        return "gpu_train.py", argv[1:]
    rest: list[str]
    if head == "torchrun":
        rest = argv[1:]
    elif is_python(argv[0]):
        rest = argv[1:]
        while rest and rest[0].startswith("-") and rest[0] not in {"-m", "-c"}:
            rest = rest[2:] if rest[0] in {"-X", "-W"} else rest[1:]  # interpreter options
        if not rest or rest[0] == "-c":
            return None
        if rest[0] == "-m":
            if len(rest) < 2 or rest[1] != "torch.distributed.run":
                return None  # pip, pytest, ...
            rest = rest[2:]
        elif not rest[0].endswith(".py"):
            return None
    else:
        return None
    for k, word in enumerate(rest):  # the launcher's own options come before the script
        if word.endswith(".py"):
            return word.replace("\\", "/"), rest[k + 1:]
    return None


@cache
def parser_of(script: str):
    parser = importlib.import_module(script[:-3]).build_parser()
    parser.prog = script
    parser.allow_abbrev = False  # a README flag must be the flag itself, not a prefix of one
    return parser


def parse_problem(script: str, args: list[str], capsys) -> str | None:
    """None when `args` parse with the script's parser, else argparse's message (or why not)."""
    name = script.split("/")[-1]
    if name not in SCRIPTS:
        return None if (ROOT / script).is_file() else f"{script} does not exist in this project"
    if script != name:
        return f"{script}: run the script from the project folder as {name}"
    capsys.readouterr()
    try:
        parser_of(name).parse_args(args)
    except SystemExit as exc:
        if exc.code == 0:  # --help
            capsys.readouterr()
            return None
        message = capsys.readouterr().err.strip().splitlines()
        return message[-1] if message else f"exit code {exc.code}"
    return None


def block_commands(readme: str) -> list[tuple[int, str, str, list[str]]]:
    """(line number, README line, script, arguments) of every script call in the code blocks."""
    text = (ROOT / readme).read_text(encoding="utf-8")
    found = []
    for first, lines in code_blocks(text):
        for n, line in logical_lines(first, lines):
            try:
                argv = words(line)
            except ValueError:  # an unbalanced quote: not a shell line (e.g. a log excerpt)
                continue
            call = script_call(argv)
            if call:
                found.append((n, line, *call))
    return found


def mapping_rows(readme: str) -> list[tuple[str, list[str]]]:
    """(guide number, the project commands of the "run this" column) of each row of the table."""
    text = (ROOT / readme).read_text(encoding="utf-8")
    assert TABLE_START in text and TABLE_END in text, f"{readme}: no {TABLE_START} ... {TABLE_END} table"
    table = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0]
    rows = []
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.strip().startswith("|") or len(cells) < 3 or set(cells[0]) <= set("-: "):
            continue
        guide = re.search(r"\b(00[0-4])\b", cells[0])
        if guide is None:
            continue  # the header row
        commands = [c.strip() for c in re.findall(r"`([^`]+)`", cells[2])
                    if c.strip().split()[0].split("/")[0].split("\\")[0] in PROGRAMS]
        rows.append((guide.group(1), commands))
    return rows


def table_commands(readme: str) -> list[tuple[str, str, list[str]]]:
    found = []
    for guide, commands in mapping_rows(readme):
        for command in commands:
            call = script_call(words(command))
            if call:
                found.append((f"table row of guide {guide}", command, *call))
    return found


@pytest.mark.parametrize("readme", READMES)
def test_every_readme_command_parses_with_its_script(readme, capsys):
    calls = block_commands(readme)
    assert len(calls) >= 20, f"{readme}: only {len(calls)} commands found: the extraction is broken"
    failures = []
    for n, line, script, args in calls:
        problem = parse_problem(script, args, capsys)
        if problem:
            failures.append(f"{readme}:{n}: {line}\n    -> {problem}")
    assert not failures, "README commands the scripts reject:\n" + "\n".join(failures)


@pytest.mark.parametrize("readme", READMES)
def test_every_command_of_the_mapping_table_parses(readme, capsys):
    calls = table_commands(readme)
    assert len(calls) >= 40, f"{readme}: only {len(calls)} table commands found"
    failures = [f"{readme}, {where}: {line}\n    -> {problem}" for where, line, script, args in calls
                if (problem := parse_problem(script, args, capsys))]
    assert not failures, "mapping-table commands the scripts reject:\n" + "\n".join(failures)


def test_both_readmes_map_the_same_guide_commands():
    per_readme = {}
    for readme in READMES:
        rows = mapping_rows(readme)
        assert {guide for guide, _ in rows} == set(GUIDES), f"{readme}: a guide has no row"
        per_readme[readme] = {guide: sorted(c for g, cmds in rows if g == guide for c in cmds)
                              for guide in GUIDES}
        per_readme[readme]["rows"] = sorted(guide for guide, _ in rows)
    english, chinese = (per_readme[r] for r in READMES)
    for key in (*GUIDES, "rows"):
        only_en = sorted(set(english[key]) - set(chinese[key]))
        only_zh = sorted(set(chinese[key]) - set(english[key]))
        assert english[key] == chinese[key], (
            f"guide {key}: the two tables differ; only in README.md: {only_en}; "
            f"only in README.zh-CN.md: {only_zh}")


def test_the_readmes_link_each_other():
    head = "\n".join((ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:12])
    assert "README.zh-CN.md" in head, "README.md: no link to README.zh-CN.md near the top"
    assert "README.md" in (ROOT / "README.zh-CN.md").read_text(encoding="utf-8")[:2000]


def test_the_readmes_say_how_to_install_a_cpu_only_torch():
    for readme in READMES:
        text = (ROOT / readme).read_text(encoding="utf-8")
        assert "--index-url https://download.pytorch.org/whl/cpu" in text, readme


# The checks of the checks: each would pass vacuously if its extraction missed what it guards.

def test_extraction_of_continued_commented_redirected_lines(capsys):
    text = "\n".join([
        "```bash",
        "python gpu_train.py \\",
        "    --data-dir ./dataset \\",
        "    --epochs 5   # five epochs",
        "torchrun --nproc_per_node 2 multi_gpu_train.py --distributed --epochs 2 > log.txt 2>&1",
        ".venv/bin/python validate.py --model m.pth --data-dir d | tee out.txt",
        "CUDA_VISIBLE_DEVICES=0 python -m torch.distributed.run --standalone predict.py -m m.pth -i x",
        "python -m pip install torch",
        "python -c \"import torch\"",
        "```",
        "```python",
        "python gpu_train.py --not-checked",
        "```",
        "  ```bat",
        "  gpu_train.bat --resume output\\checkpoint.pth --epochs 100",
        "  ```",
    ])
    calls = []
    for first, lines in code_blocks(text):
        for _, line in logical_lines(first, lines):
            call = script_call(words(line))
            if call:
                calls.append(call)
    assert calls == [
        ("gpu_train.py", ["--data-dir", "./dataset", "--epochs", "5"]),
        ("multi_gpu_train.py", ["--distributed", "--epochs", "2"]),
        ("validate.py", ["--model", "m.pth", "--data-dir", "d"]),
        ("predict.py", ["-m", "m.pth", "-i", "x"]),
        ("gpu_train.py", ["--resume", "output\\checkpoint.pth", "--epochs", "100"]),
    ]
    assert all(parse_problem(script, args, capsys) is None for script, args in calls)


def test_a_flag_the_script_lacks_is_caught(capsys):
    problem = parse_problem("train_unet.py", ["--epochs", "2", "--no-such-flag"], capsys)
    assert problem and "--no-such-flag" in problem
    # an abbreviation argparse would accept is not a README spelling
    assert parse_problem("gpu_train.py", ["--label-smooth", "0.1"], capsys)
    assert parse_problem("gpu_train.py", ["--epochs", "many"], capsys)
    assert "does not exist" in parse_problem("train.py", [], capsys)
    assert parse_problem("finetune_gpu.py", ["--model-path=m.pt", "--lr=0.001"], capsys) is None
