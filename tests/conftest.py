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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Group tests for pytest-xdist's `--dist=loadgroup`: a file's tests stay together (they share module-scoped
    fixtures such as a chapter's grading), except in files that set `SPLIT_BETWEEN_WORKERS = True`, whose
    tests (independent dry runs) are shared out one by one."""
    for item in items:
        module = item.module
        if getattr(module, "SPLIT_BETWEEN_WORKERS", False):
            continue
        item.add_marker(pytest.mark.xdist_group(Path(str(item.fspath)).name))
