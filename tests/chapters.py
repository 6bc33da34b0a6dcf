"""Run a chapter with papermill (smoke profile unless asked), once per test run, and read its record.

Under pytest-xdist several workers may ask for the same chapter (a chapter's own tests and
the book test): a file lock per chapter and a marker holding the test run's id make the
first worker run it and the others reuse its executed notebook, which carries its record.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
from filelock import FileLock

from fasttrain_course.chapters import run_chapter, run_folder

ROOT = Path(__file__).resolve().parent.parent
EXECUTED = ROOT / "_build" / "executed"
RESULTS = ROOT / "results"
_done: dict[str, tuple[Path, dict]] = {}


def _run_id() -> str | None:
    return os.environ.get("PYTEST_XDIST_TESTRUNUID")


def execute_chapter(slug: str, profile: str = "smoke", dry_run: bool | str = False) -> tuple[Path, dict]:
    """Execute `solutions/<slug>` with papermill (once per test run); return (executed notebook, record)."""
    folder = run_folder(profile, dry_run)
    key = f"{slug}:{folder}"
    if key in _done:
        return _done[key]
    out = EXECUTED / folder / f"{slug}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    marker = out.with_name(f"{slug}.run")
    with FileLock(str(out.with_name(f"{slug}.lock"))):
        run_id = _run_id()
        if not (run_id is not None and marker.exists() and marker.read_text() == run_id and out.exists()):
            out.unlink(missing_ok=True)  # a stale notebook must not pass for this run's
            marker.unlink(missing_ok=True)
            outcome = run_chapter(slug, profile, root=ROOT, out_dir=EXECUTED, results_dir=RESULTS, dry_run=dry_run)
            print(f"{slug}: papermill {folder} run took {outcome.seconds:.1f} s")
            if run_id is not None:
                marker.write_text(run_id)
    record = nbformat.read(str(out), as_version=4).metadata["fasttrain"]["record"]
    _done[key] = (out, record)
    return _done[key]
