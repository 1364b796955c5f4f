"""Shared test settings: W&B never goes online, data paths, small games."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import runpy
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _wandb_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def digits():
    from las_env.datasets import load_dataset

    return load_dataset("digits")


def requires_shared_data():
    return pytest.mark.skipif(
        not SHARED_DATA.is_dir(),
        reason=f"real CIFAR copies not found at {SHARED_DATA} (they live in ../shared/data beside the repo)",
    )


# Tests use small models and tiny batches: one thread avoids OpenMP synchronisation
# overhead, which measured 2-3x slower with two threads on the 2-core CI machine.
torch.set_num_threads(1)


class Ran:
    """A finished command: its exit status, output, and the CPU seconds it used."""

    def __init__(self, returncode: int, stdout: str, stderr: str, cpu_s: float) -> None:
        self.returncode, self.stdout, self.stderr, self.cpu_s = returncode, stdout, stderr, cpu_s


def main_in_process(command: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> Ran:
    """Run ``python experiments/<command>.py ARGS`` from ``cwd`` in this process: the script itself,
    run as ``__main__`` with its ``sys.argv``, a Python start-up less than a subprocess.

    For the cases a test checks without a fresh process; each kind of failure keeps one real
    command-line case in a subprocess. ``cpu_s`` is this process's CPU time during the call.
    """
    script = REPO / "experiments" / f"{command}.py"
    out, err = io.StringIO(), io.StringIO()
    code = 0
    started = time.process_time()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        patch.setattr(sys, "argv", [str(script), *args])
        patch.setattr(sys, "path", list(sys.path))  # the script adds its folder and the cwd
        patch.chdir(cwd)
        patch.delenv("HYDRA_FULL_ERROR", raising=False)
        patch.setenv("WANDB_MODE", "disabled")
        for key, value in (env or {}).items():
            patch.setenv(key, value)
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return Ran(code, out.getvalue(), err.getvalue(), time.process_time() - started)


def load_script(path: Path) -> ModuleType:
    """A script as a module, its ``__main__`` block not run: its functions, called in this process."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
