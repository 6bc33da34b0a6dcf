"""Submissions autograded per minute by `fasttrain grade --jobs N`, in the sandbox and without it.

A class of chapter-1 submissions (alternately the solution and the blank student notebook) is
graded twice in fresh course folders laid out like the repository: once with the course's
nbgrader_config.py as it is (every kernel in the bubblewrap sandbox), once with
`--SandboxedKernelManager.enabled=False`. Both runs use the same workers; the ratio is the
sandbox's cost. Run it from the repository root, alone on the machine:

    .venv/bin/python benchmarks/grading_throughput.py --students 8 --jobs 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fasttrain_course.grade import grade_class  # noqa: E402

BIN = Path(sys.executable).parent


def make_class(course: Path, slug: str, students: int) -> None:
    """A course folder with the chapter released and `students` submissions in submitted/."""
    shutil.copytree(ROOT / "solutions" / slug, course / "solutions" / slug)
    shutil.copy(ROOT / "nbgrader_config.py", course / "nbgrader_config.py")
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    subprocess.run([str(BIN / "nbgrader"), "generate_assignment", slug, "--force"], cwd=course, env=env,
                   check=True, capture_output=True)
    source = nbformat.read(str(course / "solutions" / slug / f"{slug}.ipynb"), as_version=4)
    blank = nbformat.read(str(course / "course" / slug / f"{slug}.ipynb"), as_version=4)
    for i in range(students):
        folder = course / "submitted" / f"student{i:03d}" / slug
        folder.mkdir(parents=True)
        nbformat.write(source if i % 2 == 0 else blank, str(folder / f"{slug}.ipynb"))


def measure(slug: str, students: int, jobs: int, sandbox: bool) -> float:
    """Submissions per minute (wall time of the whole class, start to end)."""
    with tempfile.TemporaryDirectory(prefix="grading_bench_") as tmp:
        course = Path(tmp)
        make_class(course, slug, students)
        args = [] if sandbox else ["--SandboxedKernelManager.enabled=False"]
        start = time.perf_counter()
        runs = grade_class(course, slug, jobs=jobs, nbgrader_args=args, log=lambda line: None)
        seconds = time.perf_counter() - start
        failed = [s for s, r in runs.items() if r.returncode != 0]
        if failed:
            raise SystemExit(f"grading failed for {failed}:\n{runs[failed[0]].stderr[-3000:]}")
        return 60 * students / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chapter", default="01_optimizers")
    parser.add_argument("--students", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="measure each mode this many times (alternating)")
    args = parser.parse_args()
    one, five, _ = os.getloadavg()
    print(f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC | {os.cpu_count()} cores | load average "
          f"{one:.1f} (1 min), {five:.1f} (5 min) | {args.students} submissions of {args.chapter}, {args.jobs} jobs")
    rates = {"sandbox": [], "no sandbox": []}
    for _ in range(args.repeats):
        for mode in rates:
            rates[mode].append(measure(args.chapter, args.students, args.jobs, sandbox=mode == "sandbox"))
            print(f"  {mode:>10}: {rates[mode][-1]:.1f} submissions per minute", flush=True)
    best = {mode: max(r) for mode, r in rates.items()}
    print(f"sandboxed {best['sandbox']:.1f} per minute, unsandboxed {best['no sandbox']:.1f} per minute "
          f"(best of {args.repeats}); ratio sandboxed/unsandboxed {best['sandbox'] / best['no sandbox']:.2f}")


if __name__ == "__main__":
    main()
