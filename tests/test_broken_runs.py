"""A failed, a killed and a target-missing run never replace the last good page: the book keeps it and says so.

The scenarios run a tiny stand-in for chapter 1 (same slug and targets, seconds to run) in a
course folder of its own, with the real `run_chapter`, records and book build.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import nbformat
import pytest

from conftest import ROOT
from fasttrain_course.book import book_page, build_book
from fasttrain_course.chapters import ChapterRunFailed, run_chapter

SLUG = "01_optimizers"

CELLS = [
    ("markdown", "# 1. A stand-in chapter\n\nIt reports its two metrics."),
    ("code", 'profile = "smoke"\ndevice = "cpu"\ndata_dir = None\nseed = 0\nresults_dir = "results"\n'
             'dry_run = False\nallow_cpu_full = False\nmode = "ok"\nlabel = "first"'),
    ("code", 'import time\nimport fasttrain\nrun = fasttrain.start("01_optimizers", profile=profile, device=device,\n'
             '    seed=seed, results_dir=results_dir, dry_run=dry_run, allow_cpu_full=allow_cpu_full)'),
    ("code", 'print(f"output of the {label} run")\nif mode == "fail":\n    raise ValueError("a bug in this cell")\n'
             'if mode == "slow":\n    print("sleeping", flush=True)\n    time.sleep(600)'),
    ("code", 'run.metric("adam_epochs_to_fit_100", 20 if mode != "miss" else 99)\n'
             'run.metric("digits_test_accuracy", 0.97)\nrun.finish()'),
]


@pytest.fixture
def course(tmp_path):
    root = tmp_path / "course"
    root.mkdir()
    for name in ("_config.yml", "_toc.yml", "pyproject.toml"):
        shutil.copy(ROOT / name, root / name)
    shutil.copytree(ROOT / "book", root / "book", ignore=shutil.ignore_patterns("chapters", "generated", "results.md"))
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for i, (kind, source) in enumerate(CELLS):
        cell = (nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell)(source)
        cell.id = f"cell-{i}"
        if i == 1:
            cell.metadata["tags"] = ["parameters"]
        nb.cells.append(cell)
    (root / "solutions" / SLUG).mkdir(parents=True)
    nbformat.write(nb, str(root / "solutions" / SLUG / f"{SLUG}.ipynb"))
    return root


def run(course, mode, label):
    return run_chapter(SLUG, "smoke", root=course, parameters={"mode": mode, "label": label, "device": "cpu"})


def page_text(course):
    page = book_page(course / "_build" / "executed" / "smoke" / f"{SLUG}.ipynb", course)
    return "\n".join(c.source + "".join(o.get("text", "") for o in c.get("outputs", [])) for c in page.cells)


def test_a_failed_run_keeps_the_last_good_page_and_the_page_says_so(course):
    run(course, "ok", "first")
    with pytest.raises(ChapterRunFailed, match="ValueError: a bug in this cell"):
        run(course, "fail", "second")
    executed = course / "_build" / "executed" / "smoke"
    assert (executed / f"{SLUG}.failed.ipynb").is_file(), "the failed run's notebook is kept aside"
    text = page_text(course)
    assert "output of the first run" in text and "output of the second run" not in text
    assert "failed (ValueError: a bug in this cell)" in text and "last good run" in text
    statuses = [json.loads(p.read_text())["status"] for p in sorted((course / "results" / "smoke" / SLUG).glob("*.json"))]
    assert statuses == ["passed", "failed"]


def test_a_missed_target_never_replaces_the_passing_record_or_page(course):
    run(course, "ok", "first")
    with pytest.raises(ChapterRunFailed, match="Target missed"):
        run(course, "miss", "second")
    current = json.loads((course / "results" / "smoke" / f"{SLUG}.json").read_text())
    assert current["passed"] is True
    text = page_text(course)
    assert "output of the first run" in text and "finished but missed a target" in text


SCRIPT = textwrap.dedent("""
    import sys
    from fasttrain_course.chapters import run_chapter
    run_chapter("01_optimizers", "smoke", root=sys.argv[1], parameters={"mode": "slow", "label": "killed", "device": "cpu"})
""")


def test_a_run_killed_half_way_leaves_the_last_good_page_which_says_it_did_not_finish(course, tmp_path):
    run(course, "ok", "first")
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(course)], start_new_session=True)
    partial = course / "_build" / "executed" / "smoke" / f".{SLUG}.running.ipynb"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if partial.exists() and "sleeping" in partial.read_text():
                break
            time.sleep(0.2)
        assert partial.exists(), "the killed run never got going"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    good = nbformat.read(str(course / "_build" / "executed" / "smoke" / f"{SLUG}.ipynb"), as_version=4)
    assert good.metadata["fasttrain"]["record"]["status"] == "passed"
    text = page_text(course)
    assert "output of the first run" in text and "did not finish" in text


def test_the_book_builds_from_the_last_good_run_after_a_failure(course):
    run(course, "ok", "first")
    with pytest.raises(ChapterRunFailed):
        run(course, "fail", "second")
    build_book(course, strict=True)
    html = (course / "_build" / "html" / "book" / "chapters" / f"{SLUG}.html").read_text()
    assert "output of the first run" in html and "output of the second run" not in html
    assert "A later run of this chapter" in html
