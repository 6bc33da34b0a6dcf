"""Shared test setup: the data root, and a private cache folder for the test session."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # so tests can import chapters.py and grading.py

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel workers share the cores: one thread each (inherited by the notebook kernels they
    # start), since oversubscribed OpenMP threads make small models many times slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

if "FASTTRAIN_DATA" not in os.environ:
    shared = ROOT.parent / "shared" / "data" / "cifar10"
    if shared.is_dir():
        os.environ["FASTTRAIN_DATA"] = str(shared)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT

