"""The course's build steps: run chapters with papermill, derive the book pages, release assignments."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat

from .results import load_records

ROOT = Path(__file__).resolve().parent.parent


def repo_root() -> Path:
    """The course repository's root (the folder holding `solutions/` and `_config.yml`)."""
    for candidate in (Path.cwd(), *Path.cwd().parents, ROOT):
        if (candidate / "solutions").is_dir() and (candidate / "_config.yml").is_file():
            return candidate
    raise FileNotFoundError("Run this inside the course repository (the folder with solutions/ and _config.yml).")


def chapters(root: Path | None = None) -> list[str]:
    """The chapter slugs found in `solutions/`, in order."""
    root = root or repo_root()
    return sorted(p.name for p in (root / "solutions").iterdir()
                  if p.is_dir() and (p / f"{p.name}.ipynb").is_file())


def resolve_chapters(names: list[str] | None, root: Path | None = None) -> list[str]:
    """Chapter slugs for `names` (full slugs or their number prefix, e.g. '01'); all when empty."""
    available = chapters(root)
    if not names:
        return available
    picked = []
    for name in names:
        match = [c for c in available if c == name or c.split("_", 1)[0] == name]
        if not match:
            raise SystemExit(f"Unknown chapter {name!r}: choose from {', '.join(available)}")
        picked += match
    return picked


def _bin(name: str) -> str:
    """Path of a console script installed beside this Python (the venv's bin/)."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def run_chapter(slug: str, profile: str = "smoke", out_dir: Path | None = None, results_dir: Path | None = None,
                parameters: dict | None = None, root: Path | None = None) -> tuple[Path, float]:
    """Execute one solution notebook with papermill; return the executed copy and the wall seconds."""
    import papermill

    root = root or repo_root()
    out_dir = Path(out_dir or root / "_build" / "executed")
    results_dir = Path(results_dir or root / "results").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    source = root / "solutions" / slug / f"{slug}.ipynb"
    target = out_dir / f"{slug}.ipynb"
    params = {"profile": profile, "results_dir": str(results_dir), **(parameters or {})}
    start = time.perf_counter()
    papermill.execute_notebook(str(source), str(target), parameters=params, kernel_name="python3",
                               cwd=str(source.parent), progress_bar=False)
    return target, time.perf_counter() - start


def repository_url(root: Path | None = None) -> str:
    """The course repository's URL, from `repository.url` in _config.yml."""
    import yaml

    config = yaml.safe_load(((root or repo_root()) / "_config.yml").read_text())
    return config["repository"]["url"].rstrip("/")


def launch_links(slug: str, root: Path | None = None) -> str:
    """Markdown buttons that open the chapter's STUDENT notebook (course/) in Colab and Binder."""
    url = repository_url(root)
    owner_repo = url.split("github.com/", 1)[-1]
    path = f"course/{slug}/{slug}.ipynb"
    colab = f"https://colab.research.google.com/github/{owner_repo}/blob/main/{path}"
    binder = f"https://mybinder.org/v2/gh/{owner_repo}/main?labpath={path}"
    return (f"[![Open the assignment in Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab}) "
            f"[![Open the assignment in Binder](https://mybinder.org/badge_logo.svg)]({binder})")


def book_page(executed: Path, record: dict | None, root: Path | None = None) -> nbformat.NotebookNode:
    """The book's chapter page: the executed notebook with solutions and hidden tests removed, outputs kept."""
    from nbgrader.preprocessors import ClearHiddenTests, ClearSolutions

    nb = nbformat.read(str(executed), as_version=4)
    nb, _ = ClearSolutions().preprocess(nb, {})
    nb, _ = ClearHiddenTests().preprocess(nb, {})
    for cell in nb.cells:
        cell.metadata.pop("nbgrader", None)
    if record is not None:
        line = (f"*This page shows a recorded run: profile `{record['profile']}` on "
                f"{record['device']}, {record['date'][:10]}, {record['wall_seconds']:.0f} s, "
                f"torch {record['torch_version']}. Its results are on the [results page](../results.md). "
                "The exercises' solutions are hidden: open the assignment notebook to write them.*")
    else:
        line = "*This page shows an executed run whose results record was not found.*"
    note = nbformat.v4.new_markdown_cell(launch_links(executed.stem, root) + "\n\n" + line)
    note.id = "recorded-run"
    title_at = 1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0
    nb.cells.insert(title_at, note)
    return nb


def results_page(records: list[dict]) -> str:
    """The results page (Markdown) generated from the results records."""
    lines = ["# Results", "",
             "Every chapter run writes a results record (`results/<profile>/<chapter>.json`); this page is "
             "generated from those records by `fasttrain book`, nothing in it is typed by hand. The `smoke` "
             "profile runs on a CPU in minutes and is what CI checks; `full` is the GPU profile with the "
             "real targets. CIFAR-10 figures measured on the course's test copy (decoded from a JPEG "
             "re-encoding) are close to, but not identical with, figures on the original test set.", ""]
    if not records:
        lines.append("No results records were found: run `fasttrain run` first.")
        return "\n".join(lines) + "\n"
    lines += ["| chapter | profile | device | metric | value | target | reached | wall s | date |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for rec in records:
        for m in rec["metrics"]:
            target = "" if m["target"] is None else f"{m['direction']} {m['target']:g}"
            reached = "" if m["passed"] is None else ("yes" if m["passed"] else "**no**")
            lines.append(f"| {rec['chapter']} | {rec['profile']} | {rec['device']} | {m['metric']} | "
                         f"{m['value']:.4g} | {target} | {reached} | {rec['wall_seconds']:.0f} | {rec['date'][:10]} |")
    lines += ["", "Torch versions: " + ", ".join(sorted({r["torch_version"] for r in records})) + "."]
    return "\n".join(lines) + "\n"


def build_book(executed_dir: Path | None = None, results_dir: Path | None = None, root: Path | None = None,
               strict: bool = True) -> Path:
    """Write book/chapters/*.ipynb and book/results.md, then build the HTML with Jupyter Book."""
    root = root or repo_root()
    executed_dir = Path(executed_dir or root / "_build" / "executed")
    records = load_records(results_dir or root / "results")
    by_chapter = {}
    for rec in records:  # prefer the full profile's record when both exist for a page
        by_chapter.setdefault(rec["chapter"], rec)
    pages = root / "book" / "chapters"
    if pages.exists():
        shutil.rmtree(pages)
    pages.mkdir(parents=True)
    for executed in sorted(executed_dir.glob("*.ipynb")):
        nb = book_page(executed, by_chapter.get(executed.stem))
        nbformat.write(nb, str(pages / executed.name))
    (root / "book" / "results.md").write_text(results_page(records))
    cmd = [_bin("jupyter-book"), "build", str(root), "--path-output", str(root)]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    subprocess.run(cmd, check=True, env=_env(), cwd=str(root))
    return root / "_build" / "html" / "index.html"


def release(root: Path | None = None, names: list[str] | None = None) -> None:
    """Regenerate the student notebooks in course/ from solutions/ with nbgrader."""
    root = root or repo_root()
    for slug in resolve_chapters(names, root):
        subprocess.run([_bin("nbgrader"), "generate_assignment", slug, "--force",
                        f"--CourseDirectory.root={root}"], check=True, env=_env(), cwd=str(root))


def comparable(nb: nbformat.NotebookNode) -> list[tuple]:
    """What must match between a committed and a regenerated student notebook: each cell's id, type, source, metadata."""
    nb = copy.deepcopy(nb)
    return [(c.get("id"), c.cell_type, c.source, json.dumps(c.metadata, sort_keys=True)) for c in nb.cells]
