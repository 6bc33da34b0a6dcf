"""Run a chapter with papermill in the smoke profile, once per test session, and read its record."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fasttrain.course import run_chapter

ROOT = Path(__file__).resolve().parent.parent
EXECUTED = ROOT / "_build" / "executed"
RESULTS = ROOT / "results"
_done: dict[str, tuple[Path, dict]] = {}


def execute_chapter(slug: str, profile: str = "smoke") -> tuple[Path, dict]:
    """Execute `solutions/<slug>` with papermill (once per session); return (executed notebook, record)."""
    key = f"{slug}:{profile}"
    if key not in _done:
        record_path = RESULTS / profile / f"{slug}.json"
        if record_path.exists():
            record_path.unlink()  # a stale record must not pass for this run's
        out, seconds = run_chapter(slug, profile, out_dir=EXECUTED, results_dir=RESULTS, root=ROOT)
        assert record_path.exists(), f"{slug} ran but wrote no results record at {record_path}"
        record = json.loads(record_path.read_text())
        record["papermill_seconds"] = seconds
        print(f"{slug}: papermill {profile} run took {seconds:.1f} s")
        _done[key] = (out, record)
    return _done[key]
