"""The docs and `--help` agree: every `defect-tune ...` command line in the README, the guides, the
cluster docs and a results folder's COMMANDS.md parses under the real command line, and every
synopsis (`defect-tune CMD [--opt DEFAULT] ...`) names every option of its command, each with the
default `--help` shows."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import typer
from typer._click.exceptions import MissingParameter, UsageError

from defect_tune.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "clusters" / "README.md",
               *(ROOT / "results").glob("**/COMMANDS.md")])
SHELL_STOPS = ("&&", "||", "|", ";", ">", "2>&1")


def command_lines(text: str) -> list[str]:
    """`defect-tune ...` lines of the shell blocks (continuations joined; shown output and prose
    left out) and of inline code spans."""
    found = []
    for block in re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", text, flags=re.S):
        block = re.sub(r"\\\n", " ", block)
        block = re.sub(r"\n(\s+\[)", r" \1", block)  # a synopsis wrapped without a backslash
        found += [line.strip() for line in block.splitlines() if line.strip().startswith("defect-tune ")]
    return found + re.findall(r"`(defect-tune [^`]+)`", text)


def resolve(words: list[str]):
    """The click command a `defect-tune` argument list names, and the arguments left for it."""
    command, words = typer.main.get_command(app), list(words)
    while hasattr(command, "commands") and words and words[0] in command.commands:
        command = command.commands[words.pop(0)]
    return command, words


def documented() -> list[tuple[str, str]]:
    return [(str(path.relative_to(ROOT)), line) for path in DOCS for line in command_lines(path.read_text())]


def is_synopsis(line: str) -> bool:
    return "[--" in line


def test_the_docs_hold_command_lines_and_synopses_to_check():
    lines = documented()
    synopses = {resolve(shlex.split(line)[1:])[0].name for _, line in lines if is_synopsis(line)}
    assert len(lines) > 40 and {"prepare", "train", "search", "report", "export", "retrain"} <= synopses


@pytest.mark.parametrize(("where", "line"), [entry for entry in documented() if not is_synopsis(entry[1])])
def test_every_documented_command_line_parses(where, line):
    words = shlex.split(line, comments=True)[1:]
    while words:
        cut = next((i for i, word in enumerate(words) if word in SHELL_STOPS), len(words))
        words, after = words[:cut], []
        if "--" in words:  # `submit [OPTIONS] -- COMMAND ...`: the command after it is checked too
            words, after = words[:words.index("--")], words[words.index("--") + 1:]
        command, arguments = resolve(words)
        if hasattr(command, "commands"):  # `defect-tune --version`, or `defect-tune COMMAND --help`
            options = {opt for param in command.params for opt in param.opts}
            assert arguments and (arguments[0] in options or arguments[0].isupper()), (
                f"{where}: `{line}`: no such command")
        else:
            try:
                command.make_context(command.name, arguments)
            except MissingParameter:
                pass  # prose naming a command (`defect-tune train`) without its required options
            except UsageError as error:
                pytest.fail(f"{where}: `{line}`: {error.format_message()}")
        words = after


def test_every_synopsis_names_every_option_with_its_default():
    problems = []
    for where, line in documented():
        if not is_synopsis(line):
            continue
        command, _ = resolve(shlex.split(line.replace("|", " "))[1:])
        options = {opt: param for param in command.params for opt in [*param.opts, *param.secondary_opts]
                   if opt.startswith("--")}
        named = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", line))
        problems += [f"{where}: {command.name} shows {opt} as required, but it has a default"
                     for opt in _outside_brackets(line) if opt in options and not options[opt].required]
        problems += [f"{where}: {command.name} has no {opt}" for opt in sorted(named - set(options))]
        shown = {param.opts[0] for opt, param in options.items() if opt in named}
        problems += [f"{where}: {command.name}'s synopsis leaves out {param.opts[0]}"
                     for param in command.params if param.opts[0].startswith("--") and param.opts[0] != "--help"
                     and param.opts[0] not in shown and not param.hidden]
        for opt, value in re.findall(r"\[(--[a-z][\w-]*) ([^\]\s|]+)\]", line):
            if opt not in options or value.upper() == value or re.search(r"[A-Z]", value):
                continue  # a placeholder (DIR, N, results/NAME), not a value
            default = options[opt].default
            same = (str(default) == value if not isinstance(default, int | float) or isinstance(default, bool)
                    else _number(value) == default)
            if not same:
                problems.append(f"{where}: {command.name} [{opt} {value}] but --help's default is {default!r}")
    assert not problems, "\n".join(problems)


def _outside_brackets(line: str) -> list[str]:
    depth, kept = 0, []
    for char in line:
        depth += (char == "[") - (char == "]")
        kept.append(char if depth == 0 and char != "]" else " ")
    return re.findall(r"(?<![\w-])--[a-z][\w-]*", "".join(kept))


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# The smallest faithful version of the quick start: every command as written, with 2 trials of
# one epoch (a retraining then trains one epoch too).
QUICK_START_SMALLER = {"--num-samples 10": "--num-samples 2 epochs=1"}


def quick_start() -> list[str]:
    text = (ROOT / "README.md").read_text().split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.slow
def test_the_readme_quick_start_runs_as_written(tmp_path):
    """Run in an empty folder, as a newcomer's shell would: step 0 is this test's own set-up (the
    dev extra carries the elpv images); every other command runs verbatim but for
    QUICK_START_SMALLER, and leaves what the README says it leaves."""
    import os
    import subprocess
    import sys

    pytest.importorskip("elpv_dataset", reason="the quick start's data: pip install -e '.[elpv]' (in the dev extra)")
    setup, *commands = quick_start()
    assert setup == "source .venv/bin/activate && pip install -e '.[elpv]'"
    assert [command.split()[:2] for command in commands] == [
        ["defect-tune", "prepare"], ["defect-tune", "search"], ["defect-tune", "report"], ["defect-tune", "export"],
        ["defect-tune", "retrain"], ["defect-tune", "predict"]]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "WANDB_MODE": "offline"}
    for command in commands:
        for long, short in QUICK_START_SMALLER.items():
            command = command.replace(long, short)
        ran = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=900)
        assert ran.returncode == 0, f"{command}\n{ran.stdout[-2000:]}\n{ran.stderr[-3000:]}"

    import pandas as pd

    meta = json.loads((tmp_path / "data" / "elpv" / "meta.json").read_text())
    assert meta["classes"] == ["defective"] and sum(s["images"] for s in meta["splits"].values()) == 2624
    board = pd.read_csv(tmp_path / "results" / "elpv-quick" / "leaderboard.csv")
    assert len(board) == 2 and set(board["starting_point"]) == {"transfer", "baseline"}
    assert (tmp_path / "results" / "elpv-quick" / "report" / "report.html").is_file()
    assert {"model.onnx", "model.json", "MODEL_CARD.md"} <= {p.name for p in (tmp_path / "models" / "elpv").iterdir()}
    preds = pd.read_csv(tmp_path / "preds.csv")
    assert len(preds) == 2624 and preds["error"].isna().all() and set(preds["pred/defective"]) <= {0, 1}
