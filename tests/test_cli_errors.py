"""Hydra's own failures (experiments/config/cli.py) end in the one-paragraph error, for run.py and evaluate.py.

One case per command is a real command in a subprocess (the paragraph is printed by the process's
entry point, around ``@hydra.main``; they run in parallel since most of their time is start-up); the
other cases run the same entry point in-process (``tests/conftest.py``).
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import main_in_process

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {"run": REPO / "experiments" / "run.py", "evaluate": REPO / "experiments" / "evaluate.py"}

CASES = {
    # name: (command, arguments, words the paragraph must contain)
    "run-unwritable-dir": ("run", ["hydra.run.dir=/proc/forbidden"], ["/proc/forbidden", "hydra.run.dir"]),
    "run-unwritable-root": ("run", ["run_root=/proc/forbidden"], ["/proc/forbidden", "run_root="]),
    "run-empty-option": ("run", ["agent="], ["agent= needs an option", "reinforce"]),
    "run-unknown-option": ("run", ["agent=nosuch"], ["'nosuch'", "reinforce"]),
    "run-unknown-data": ("run", ["data=nosuch"], ["'nosuch'", "digits"]),
    "run-key-not-in-config": ("run", ["nosuchkey=1"], ["nosuchkey is not a setting", "+nosuchkey=VALUE"]),
    "run-nested-key-not-in-config": ("run", ["eval.nosuch=3"], ["eval.nosuch is not a setting", "--cfg job"]),
    "run-bad-syntax": ("run", ["seed=[1"], ["cannot be parsed", "override_grammar"]),
    "run-wrong-type": ("run", ["data.batch_size=abc"], ["data.batch_size=abc: must be of type Integer", "--cfg job"]),
    "evaluate-unwritable-dir": ("evaluate", ["hydra.run.dir=/proc/forbidden"], ["/proc/forbidden", "hydra.run.dir"]),
    "evaluate-unknown-option": ("evaluate", ["data=nosuch"], ["'nosuch'", "cifar10"]),
    "evaluate-empty-option": ("evaluate", ["model="], ["model= needs an option", "resnet18"]),
    "evaluate-key-not-in-config": ("evaluate", ["nosuchkey=1"], ["nosuchkey is not a setting", "evaluate.py"]),
    "evaluate-bad-syntax": ("evaluate", ["n=[1"], ["cannot be parsed"]),
}


# One real command line per entry point; the rest in-process (the same code around @hydra.main).
IN_CLI = ["run-unknown-option", "evaluate-unknown-option"]


def _call(command: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    inherited = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env = {**inherited, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, str(COMMANDS[command]), *args, "progress=false"], cwd=cwd,
                          capture_output=True, text=True, env=full_env, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("hydra_failures")
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(_call, *CASES[name][:2], cwd) for name in IN_CLI}
        return {name: f.result() for name, f in futures.items()}, cwd


@pytest.mark.parametrize("case", list(CASES))
def test_hydra_failure_is_one_paragraph_with_status_1(runs, case):
    procs, cwd = runs
    command, args, expected = CASES[case]
    proc = procs[case] if case in IN_CLI else main_in_process(command, *args, "progress=false", cwd=cwd)
    code, stderr = proc.returncode, proc.stderr
    assert code == 1, stderr
    assert "Traceback" not in stderr
    assert "HYDRA_FULL_ERROR" not in stderr  # Hydra's own report did not print
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("las-at: error: "), stderr
    for words in expected:
        assert words in lines[0], lines[0]
    assert not list(cwd.rglob("checkpoint.pt"))


def test_hydra_full_error_still_gives_hydras_traceback(tmp_path, monkeypatch, capsys):
    # In-process: Hydra's exception leaves the script unreported (a subprocess would print its traceback).
    from hydra.errors import ConfigCompositionException  # noqa: PLC0415

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", [str(COMMANDS["run"]), "nosuchkey=1", "progress=false"])
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigCompositionException, match="nosuchkey"):
        runpy.run_path(str(COMMANDS["run"]), run_name="__main__")
    assert "las-at: error" not in capsys.readouterr().err


def test_an_exception_inside_the_task_is_not_disguised_as_hydras(tmp_path, monkeypatch):
    # A bug in the task function (here: an OSError, as Hydra's folder failures are) keeps its traceback.
    import hydra  # noqa: PLC0415

    from experiments.config.cli import hydra_entry  # noqa: PLC0415

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "c.yaml").write_text("x: 1\nhydra:\n  run:\n    dir: .\n  output_subdir: null\n")

    @hydra.main(config_path=str(tmp_path / "conf"), config_name="c", version_base="1.3")
    def main(cfg):
        raise FileNotFoundError(2, "inside the task", "/some/file")

    monkeypatch.setattr(sys, "argv", ["prog.py"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="inside the task"):
        hydra_entry(main, conf_dir=tmp_path / "conf")
    assert "HYDRA_FULL_ERROR" not in os.environ
