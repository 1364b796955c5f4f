"""Every command in README.md and docs/*.md runs as written.

The commands are read from the pages themselves: each line of a ``bash`` block (continuation
lines and multi-line quotes joined) and each inline code span that starts with a command. They
are checked cheaply, by kind:

- ``experiments/run.py`` (also under ``torchrun``/``srun``): every job of the command, ``-m``
  sweeps expanded as Hydra expands them, composes with Hydra and passes the settings' checks
  (``settings_from_config``), i.e. everything a run does before it trains;
- ``experiments/evaluate.py``: composes with Hydra;
- any other repository script: its arguments parse (argparse, in-process; nothing runs);
- ``python -m cProfile`` is checked as the script it profiles;
- ``python -c`` snippets and the README's Python example run; ``pytest`` and ``bash`` name files
  that exist; ``pip install -e ".[extra]"`` names an extra of pyproject.toml.

Placeholders such as ``<run_dir>`` stand for a path. A command of a kind not listed fails the
test: give it a rule here rather than leave it unchecked.
"""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "experiments" / "conf"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
INLINE_COMMAND = re.compile(r"(?:[A-Z_]+=\S+ )*(?:python3?|torchrun|wandb|bash|pip) .*", re.S)
EXTERNAL_TOOLS = {"wandb", "python3", "."}  # set-up and upload commands: nothing of ours to check


def _shell_lines(block: str) -> list[str]:
    """One string per shell command: backslash continuations and open quotes joined, comments dropped."""
    out, pending = [], ""
    for line in block.splitlines():
        pending = f"{pending}\n{line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # a quote still open: the command goes on
            continue
        if pending.strip() and not pending.lstrip().startswith("#"):
            out.append(pending.strip())
        pending = ""
    return out


def page_commands() -> list[tuple[str, str]]:
    """``(page, command)`` for every command on every page."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
            if lang in ("bash", "sh"):
                found += [(page.name, c) for c in _shell_lines(body)]
        spans = re.sub(r"```.*?```", "", text, flags=re.S).split("`")[1::2]
        found += [(page.name, " ".join(c.split())) for c in spans if INLINE_COMMAND.fullmatch(c)]
    return found


def _words(command: str) -> list[str]:
    return shlex.split(re.sub(r"<[^>]+>", "PLACEHOLDER", command), comments=True)


def _run_py(args: list[str], tmp_path: Path) -> None:
    import experiments.runfolder.rundir  # noqa: F401 - registers the config's resolvers, as run.py does
    from experiments.config.settings import settings_from_config

    multirun = bool({"-m", "--multirun"} & set(args))
    # A command written for a GPU machine is checked here with the CPU (the check of device=cuda
    # needs a GPU); every other setting is checked as written.
    overrides = [re.sub(r"^device=cuda.*", "device=cpu", a) for a in args if a not in ("-m", "--multirun")]
    jobs = _sweep_jobs(overrides) if multirun else [overrides]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for job in jobs:
            if tuple(job) not in _CHECKED_JOBS:
                settings_from_config(compose("config", overrides=job), tmp_path / "run")
                _CHECKED_JOBS.add(tuple(job))


_CHECKED_JOBS: set[tuple[str, ...]] = set()
"""Jobs already composed and checked (the pages repeat many; each costs a Hydra compose)."""


def _sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """Jobs of a ``-m`` sweep in which every swept value appears at least once (job i takes each
    sweep's i-th value, or its last): each value is checked without composing the whole product."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    values = {o.input_line: list(o.sweep_string_iterator()) for o in parsed if o.is_sweep_override()}
    keys = {o.input_line: o.get_key_element() for o in parsed}
    n = max((len(v) for v in values.values()), default=1)
    return [[f"{keys[o]}={values[o][min(i, len(values[o]) - 1)]}" if o in values else o for o in overrides]
            for i in range(n)]


def _evaluate_py(args: list[str]) -> None:
    import experiments.evaluation_job.job  # noqa: F401, PLC0415 - registers evaluate_schema, as evaluate.py does
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        compose("evaluate", overrides=args)


class _Parsed(Exception):
    pass


def _arguments_parse(script: Path, args: list[str], monkeypatch) -> None:
    """Run ``script`` as ``__main__`` up to its argument parsing, and stop there."""
    assert "argparse" in script.read_text(), f"{script} does not use argparse: add a rule for it"
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        original(self, argv, namespace)  # exits 2 with argparse's message on a bad argument
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    with pytest.raises(_Parsed):
        runpy.run_path(str(script), run_name="__main__")


def check_command(command: str, tmp_path: Path, monkeypatch) -> None:
    """Check one command by its kind (module docstring); fail on a kind without a rule."""
    for part in command.split("&&"):
        words = _words(part)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
            words = words[1:]
        if not words or re.fullmatch(r"\w+=.*", words[0]) or words[0] in EXTERNAL_TOOLS:
            continue
        if words[0] in ("torchrun", "srun"):
            words = ["python", *words[next(i for i, w in enumerate(words) if w.endswith(".py")):]]
        if words[0] == "pip":
            for extra in re.findall(r"\.\[(\w+)\]", part):
                extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
                assert extra in extras, f"pip extra [{extra}] is not in pyproject.toml"
            continue
        if words[0] == "bash":
            assert (REPO / words[1]).is_file(), f"{words[1]} does not exist"
            continue
        assert words[0] == "python", f"no rule for {words[0]!r}: add one to tests/test_docs_commands.py"
        if words[1:3] == ["-m", "cProfile"]:  # the profiled script is checked as the script
            words = ["python", *words[5:]] if words[3] == "-o" else ["python", *words[3:]]
        if words[1] == "-c":
            monkeypatch.chdir(tmp_path)
            exec(compile(words[2], "<page command>", "exec"), {})
        elif words[1:3] == ["-m", "pytest"]:
            for target in words[3:]:
                assert target.startswith("-") or (REPO / target.split("::")[0]).exists(), f"{target} does not exist"
        elif words[1] == "experiments/run.py":
            _run_py(words[2:], tmp_path)
        elif words[1] == "experiments/evaluate.py":
            _evaluate_py(words[2:])
        elif words[1].startswith("../"):
            continue  # a script outside the repository (../shared/data): not ours to check
        else:
            _arguments_parse(REPO / words[1], words[2:], monkeypatch)


COMMANDS = page_commands()


def test_the_pages_hold_the_main_commands():
    commands = [_words(c) for _, c in COMMANDS]
    assert ["python", "experiments/run.py", "agent=reinforce"] in commands
    assert any(c[:2] == ["python", "experiments/evaluate.py"] for c in commands)
    assert any(c[0] == "torchrun" for c in commands)


@pytest.mark.parametrize(("page", "command"), COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_page_command_runs_as_written(page, command, tmp_path, monkeypatch):
    check_command(command, tmp_path, monkeypatch)


def test_readme_python_example_runs():
    text = (REPO / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["obs"].shape == (64, 1, 8, 8)


@pytest.mark.parametrize("command", [
    "python experiments/run.py nosuchkey=1",                      # a key the config lacks
    "python experiments/run.py -m seed=0,1 data.optim.lr=0.1,-1",  # the sweep's second value is out of range
    "python experiments/evaluate.py nosuchkey=1",
    "python benchmarks/epoch_cost.py --no-such-flag",
    "python -m pytest tests/test_no_such_file.py",
    "make all",                                                   # a kind without a rule
])
def test_a_broken_command_is_caught(command, tmp_path, monkeypatch):
    with pytest.raises((Exception, SystemExit)):
        check_command(command, tmp_path, monkeypatch)


def test_links_between_pages_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
