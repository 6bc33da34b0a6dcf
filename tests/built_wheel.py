"""A wheel of the library built once per test run (shared between xdist workers through a file lock)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from filelock import FileLock

from conftest import ROOT

DIST = ROOT / "_build" / "wheel"


def library_wheel() -> Path:
    """The path of a freshly built fasttrain_course wheel of this checkout."""
    DIST.mkdir(parents=True, exist_ok=True)
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
    marker = DIST / "built.run"
    with FileLock(str(DIST / "build.lock")):
        wheels = list(DIST.glob("fasttrain_course-*.whl"))
        if not (marker.exists() and marker.read_text() == run_id and wheels):
            for old in wheels:
                old.unlink()
            shutil.rmtree(ROOT / "build", ignore_errors=True)  # setuptools' staging folder, git-ignored
            subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(DIST), str(ROOT)], check=True, capture_output=True)
            marker.write_text(run_id)
            wheels = list(DIST.glob("fasttrain_course-*.whl"))
    return wheels[0]
