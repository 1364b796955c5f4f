"""Shared test settings: W&B never goes online, data paths, small games."""

from __future__ import annotations

import os
from pathlib import Path

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
