"""Run a chapter with papermill in the smoke profile, once per test run, and read its record.

Under pytest-xdist several workers may ask for the same chapter (a chapter's own tests and
the book test): a file lock per chapter and a marker holding the test run's id make the
first worker run it and the others reuse its executed notebook and record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from filelock import FileLock

from fasttrain.course import run_chapter

ROOT = Path(__file__).resolve().parent.parent
EXECUTED = ROOT / "_build" / "executed"
RESULTS = ROOT / "results"
_done: dict[str, tuple[Path, dict]] = {}


def _run_id() -> str | None:
    return os.environ.get("PYTEST_XDIST_TESTRUNUID")


def execute_chapter(slug: str, profile: str = "smoke") -> tuple[Path, dict]:
    """Execute `solutions/<slug>` with papermill (once per test run); return (executed notebook, record)."""
    key = f"{slug}:{profile}"
    if key in _done:
        return _done[key]
    EXECUTED.mkdir(parents=True, exist_ok=True)
    record_path = RESULTS / profile / f"{slug}.json"
    marker = EXECUTED / f"{slug}.{profile}.run"
    with FileLock(str(EXECUTED / f"{slug}.{profile}.lock")):
        run_id = _run_id()
        if run_id is not None and marker.exists() and marker.read_text() == run_id and record_path.exists():
            out, seconds = EXECUTED / f"{slug}.ipynb", None  # executed by another worker of this run
        else:
            if record_path.exists():
                record_path.unlink()  # a stale record must not pass for this run's
            marker.unlink(missing_ok=True)
            out, seconds = run_chapter(slug, profile, out_dir=EXECUTED, results_dir=RESULTS, root=ROOT)
            assert record_path.exists(), f"{slug} ran but wrote no results record at {record_path}"
            if run_id is not None:
                marker.write_text(run_id)
            print(f"{slug}: papermill {profile} run took {seconds:.1f} s")
    record = json.loads(record_path.read_text())
    record["papermill_seconds"] = seconds
    _done[key] = (out, record)
    return _done[key]
