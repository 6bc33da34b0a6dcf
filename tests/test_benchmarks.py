"""The benchmark scripts are not tests, but they must still start: each one's --help runs its imports."""

import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name != "common.py")


def test_every_benchmark_is_listed():
    assert {"fastest_recipe.py", "flops.py", "throughput.py", "time_to_accuracy.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_starts(script):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], cwd=ROOT / "benchmarks",
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"benchmarks/{script} --help failed:\n{done.stderr[-2000:]}"
    assert "usage:" in done.stdout
