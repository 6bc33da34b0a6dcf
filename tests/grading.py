"""Drive the real nbgrader: release a chapter, submit variants of it, autograde them, read the scores."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _nbgrader(args: list[str], course: Path, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # nbgrader shells out to alembic
    env["TRAITLETS_APPLICATION_RAISE_CONFIG_FILE_ERROR"] = "1"  # a broken nbgrader_config.py fails, not ignored
    cmd = [str(BIN / "nbgrader"), *args, f"--CourseDirectory.root={course}",
           "--CourseDirectory.source_directory=source", "--CourseDirectory.release_directory=release",
           f"--Execute.timeout={timeout}"]
    proc = subprocess.run(cmd, cwd=course, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nbgrader {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


class Scores(dict):
    """Scores per student, and the autograde log (`.log`) in which nbgrader reports what it noticed."""

    log: str = ""


def replace_solutions(nb: nbformat.NotebookNode, replacements: dict[str, str]) -> nbformat.NotebookNode:
    """A copy of `nb` whose solution cells named in `replacements` (by grade id) get new sources."""
    nb = nbformat.from_dict(nb)
    found = set()
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in replacements:
            cell.source = replacements[gid]
            found.add(gid)
    missing = set(replacements) - found
    if missing:
        raise KeyError(f"No cells with grade ids {sorted(missing)}")
    return nb


def solution_source(slug: str, grade_id: str) -> str:
    """The source of a solution cell of the chapter's source notebook (to build wrong variants from)."""
    nb = nbformat.read(str(ROOT / "solutions" / slug / f"{slug}.ipynb"), as_version=4)
    for cell in nb.cells:
        if cell.metadata.get("nbgrader", {}).get("grade_id") == grade_id:
            return cell.source
    raise KeyError(f"{slug} has no cell {grade_id!r}")


def solution_namespace(slug: str, grade_ids: tuple[str, ...], namespace: dict) -> dict:
    """Execute the named solution cells of the chapter's source notebook in `namespace`; return it."""
    for grade_id in grade_ids:
        exec(solution_source(slug, grade_id), namespace)
    return namespace


def edit_solution(slug: str, grade_id: str, old: str, new: str) -> str:
    """A wrong variant's source: the solution cell `grade_id` with `old` (which must occur) replaced by `new`."""
    src = solution_source(slug, grade_id)
    assert old in src, f"{old!r} not found in the solution of {grade_id}: update this test"
    return src.replace(old, new)


def grade_variants(slug: str, variants: dict[str, dict[str, str]], timeout: int = 60,
                   keep: Path | None = None, feedback: bool = False) -> dict[str, dict[str, float]]:
    """Autograde the solution, the blank release copy and each variant; return scores per student.

    `variants` maps a student name to {grade_id: source replacing that solution cell}: each
    variant is the released (student) notebook with every solution cell answered as in the
    source, then the named cells replaced, i.e. a student who got all but those right. The result maps each student ("solution", "blank" and the
    variants) to {"total": ..., "max": ..., grade_id: score, ...}. With `feedback`, nbgrader
    also generates each student's HTML feedback, and its path is under the key "feedback".
    """
    from nbgrader.api import Gradebook

    course = Path(tempfile.mkdtemp(prefix=f"grade_{slug}_", dir=keep))
    try:
        shutil.copytree(ROOT / "solutions" / slug, course / "source" / slug)
        shutil.copy(ROOT / "nbgrader_config.py", course / "nbgrader_config.py")  # the course's real configuration
        _nbgrader(["generate_assignment", slug, "--force"], course, timeout)
        released = nbformat.read(str(course / "release" / slug / f"{slug}.ipynb"), as_version=4)
        source = nbformat.read(str(course / "source" / slug / f"{slug}.ipynb"), as_version=4)
        answered = replace_solutions(released, {
            c.metadata["nbgrader"]["grade_id"]: c.source for c in source.cells
            if c.metadata.get("nbgrader", {}).get("solution")})
        students = {"solution": source, "blank": released}
        for name, replacements in variants.items():
            students[name] = replace_solutions(answered, replacements)
        for name, nb in students.items():
            folder = course / "submitted" / name / slug
            folder.mkdir(parents=True)
            nbformat.write(nb, str(folder / f"{slug}.ipynb"))
        graded = _nbgrader(["autograde", slug, "--force"], course, timeout)
        scores = Scores()
        scores.log = graded.stdout + graded.stderr
        with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
            for name in students:
                sub = gb.find_submission_notebook(slug, slug, name)
                entry = {"total": sub.score, "max": sub.max_score}
                for grade in sub.grades:
                    entry[grade.name] = grade.score
                scores[name] = entry
        _write_score_table(slug, course.name, scores)
        if feedback:
            _nbgrader(["generate_feedback", slug, "--force"], course, timeout)
            for name in students:
                html = course / "feedback" / name / slug / f"{slug}.html"
                scores[name]["feedback"] = html.read_text() if html.is_file() else None
        return scores
    finally:
        if keep is None:
            shutil.rmtree(course, ignore_errors=True)


def _write_score_table(slug: str, run: str, scores: dict) -> None:
    """Keep what each student scored in _build/grading/ (one file a grading run), for the instructor and the notes."""
    folder = ROOT / "_build" / "grading"
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["student\ttotal\tmax\tlost"]
    for name, entry in scores.items():
        lost = [g for g, v in entry.items() if g not in ("total", "max", "feedback") and v is not None
                and scores.get("solution", {}).get(g) is not None and v < scores["solution"][g]]
        lines.append(f"{name}\t{entry['total']:g}\t{entry['max']:g}\t{','.join(lost)}")
    (folder / f"{slug}-{run}.tsv").write_text("\n".join(lines) + "\n")


# --- A course laid out like this repository, graded with the README's commands (tests/test_sandbox.py) ---

def nbgrader_command(args: list[str], course: Path, check: bool = True) -> subprocess.CompletedProcess:
    """`nbgrader ARGS` run in `course` as the README says: its nbgrader_config.py, no overrides but `args`."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["TRAITLETS_APPLICATION_RAISE_CONFIG_FILE_ERROR"] = "1"
    proc = subprocess.run([str(BIN / "nbgrader"), *args], cwd=course, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"nbgrader {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def course_like_repo(slug: str, course: Path) -> tuple[nbformat.NotebookNode, nbformat.NotebookNode]:
    """Make `course` a course folder like the repository's (nbgrader_config.py, solutions/<slug>, the
    release in course/<slug>, the gradebook); return (source, answered): the source notebook, and the
    released notebook with every solution cell answered as in the source."""
    course.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "solutions" / slug, course / "solutions" / slug)
    shutil.copy(ROOT / "nbgrader_config.py", course / "nbgrader_config.py")
    nbgrader_command(["generate_assignment", slug, "--force"], course)
    released = nbformat.read(str(course / "course" / slug / f"{slug}.ipynb"), as_version=4)
    source = nbformat.read(str(course / "solutions" / slug / f"{slug}.ipynb"), as_version=4)
    answered = replace_solutions(released, {
        c.metadata["nbgrader"]["grade_id"]: c.source for c in source.cells
        if c.metadata.get("nbgrader", {}).get("solution")})
    return source, answered


def submit(course: Path, slug: str, student: str, nb: nbformat.NotebookNode) -> Path:
    """Put `nb` in submitted/<student>/<slug>/ as nbgrader expects it."""
    folder = course / "submitted" / student / slug
    folder.mkdir(parents=True)
    path = folder / f"{slug}.ipynb"
    nbformat.write(nb, str(path))
    return path


def read_scores(course: Path, slug: str, students) -> Scores:
    """Scores per student from the course's gradebook, as grade_variants returns them."""
    from nbgrader.api import Gradebook

    scores = Scores()
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        for name in students:
            sub = gb.find_submission_notebook(slug, slug, name)
            scores[name] = {"total": sub.score, "max": sub.max_score, **{g.name: g.score for g in sub.grades}}
    return scores
