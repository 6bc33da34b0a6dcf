"""Build the book once per test run (shared between xdist workers through a file lock), from the recorded runs."""

from __future__ import annotations

import os
from pathlib import Path

from filelock import FileLock

from chapters import ROOT, execute_chapter
from fasttrain_course.book import build_book, page_source
from fasttrain_course.paths import chapters

HTML = ROOT / "_build" / "html"


def built_book() -> Path:
    """The built HTML folder: chapters without a committed run are run in the smoke profile first."""
    marker = ROOT / "_build" / "book.run"
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
    with FileLock(str(ROOT / "_build" / "book.lock")):
        if marker.exists() and marker.read_text() == run_id and (HTML / "index.html").is_file():
            return HTML
        for slug in chapters(ROOT):
            source = page_source(slug, ROOT)
            if source is None or "runs" not in source.parts:
                execute_chapter(slug)
        build_book(root=ROOT, strict=True)
        marker.write_text(run_id)
    return HTML
