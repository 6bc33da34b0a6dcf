"""`fasttrain grade ASSIGNMENT --jobs N`: autograde a whole class, one `nbgrader autograde --student` per core.

Each worker is the instructor's own command, `nbgrader autograde ASSIGNMENT --student S`, run from
the course folder with its nbgrader_config.py (so every submission is sandboxed exactly as when
grading one at a time). The gradebook is one SQLite file written by all workers: SQLite lets one
writer in at a time and makes the others wait up to a busy timeout, which is 5 s by default; a
worker that waits longer fails that student with "database is locked". The workers therefore get
the gradebook's URL with a long busy timeout (`?timeout=`), so writes queue instead of failing
(tests/test_sandbox.py holds the lock for longer than the default and checks nothing is lost).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BUSY_TIMEOUT = 600  # seconds a worker waits for the gradebook's write lock


def _course_directory(root: Path):
    """nbgrader's CourseDirectory for the course at `root`, configured by its nbgrader_config.py."""
    from nbgrader.coursedir import CourseDirectory
    from traitlets.config.loader import PyFileConfigLoader

    config = PyFileConfigLoader("nbgrader_config.py", path=str(root)).load_config()
    coursedir = CourseDirectory(config=config)
    coursedir.root = str(root)
    return coursedir


def submitted_students(root: Path, assignment: str) -> list[str]:
    """The students with a submission of `assignment` (a folder submitted/<student>/<assignment>/)."""
    coursedir = _course_directory(root)
    base = Path(coursedir.format_path(coursedir.submitted_directory, ".", ".")).resolve()
    return sorted(p.parent.name for p in base.glob(f"*/{assignment}") if p.is_dir())


def gradebook_url(root: Path) -> str:
    """The gradebook's URL as nbgrader_config.py sets it, with a busy timeout for concurrent writers."""
    url = _course_directory(root).db_url
    if url.startswith("sqlite") and "timeout=" not in url:
        url += ("&" if "?" in url else "?") + f"timeout={BUSY_TIMEOUT}"
    return url


def grade_class(root: Path, assignment: str, jobs: int | None = None, students: list[str] | None = None,
                nbgrader_args: list[str] | None = None, log=print) -> dict[str, subprocess.CompletedProcess]:
    """Autograde every submitted student of `assignment` with `jobs` parallel workers; return each worker's run."""
    from nbgrader.api import Gradebook, MissingEntry

    root = Path(root).resolve()
    jobs = jobs or os.cpu_count() or 1
    students = students if students is not None else submitted_students(root, assignment)
    url = gradebook_url(root)
    with Gradebook(url) as gb:  # created here, once, not by several workers at the same time
        try:
            gb.find_assignment(assignment)
        except MissingEntry:
            raise SystemExit(f"The gradebook has no assignment {assignment!r}: run `nbgrader generate_assignment "
                             f"{assignment}` (or `fasttrain release`) first.") from None
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"  # nbgrader shells out to alembic
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))  # one core's share per worker
    env["TRAITLETS_APPLICATION_RAISE_CONFIG_FILE_ERROR"] = "1"  # never grade with a config that failed to load
    nbgrader = str(bin_dir / "nbgrader") if (bin_dir / "nbgrader").exists() else "nbgrader"

    def one(student: str) -> subprocess.CompletedProcess:
        cmd = [nbgrader, "autograde", assignment, "--student", student, f"--CourseDirectory.db_url={url}",
               *(nbgrader_args or [])]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        proc.seconds = time.perf_counter() - start
        status = "graded" if proc.returncode == 0 else f"FAILED (exit code {proc.returncode})"
        log(f"{student}: {status} in {proc.seconds:.1f} s")
        if proc.returncode != 0:
            log("\n".join((proc.stdout + proc.stderr).splitlines()[-20:]))
        return proc

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        runs = dict(zip(students, pool.map(one, students)))
    seconds = time.perf_counter() - start
    if students:
        log(f"{len(students)} submissions of {assignment} in {seconds:.0f} s with {jobs} jobs: "
            f"{60 * len(students) / seconds:.1f} per minute")
    return runs


def nbgrader_course(root: str | os.PathLike | None) -> Path:
    """The course folder: `root`, else the working folder or the first of its parents with an nbgrader_config.py."""
    candidates = [Path(root).resolve()] if root else [Path.cwd(), *Path.cwd().parents]
    for folder in candidates:
        if (folder / "nbgrader_config.py").is_file():
            return folder
    raise SystemExit(f"No nbgrader_config.py in {candidates[0]}" + ("" if root else " or its parents")
                     + ": run this in the course folder or pass --root.")


def main(root: str | os.PathLike | None, assignment: str, jobs: int | None, students: list[str] | None,
         nbgrader_args: list[str]) -> int:
    root = nbgrader_course(root)
    runs = grade_class(root, assignment, jobs, students or None, nbgrader_args)
    if not runs:
        print(f"No submissions of {assignment} (looked for submitted/<student>/{assignment}/)", file=sys.stderr)
        return 1
    failed = [s for s, r in runs.items() if r.returncode != 0]
    if failed:
        print(f"Autograding failed for: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
