"""The book: chapter pages derived from recorded runs, the results page from their records, the HTML build.

Each chapter page is one recorded run: the committed best run in `runs/` (full, else cpu) when
there is one, else the last good local run in `_build/executed/` (full, cpu, then smoke). Its
header comes from the record embedded in that very notebook. Solutions and hidden tests are
removed, outputs kept. While the run's code is the chapter's current code, the prose is taken
from the current source (so a corrected sentence shows without a new run); a run of older code
is shown as it ran, with a note saying so. A later run that failed, missed its targets or never
finished is named on the page, which keeps showing the last good run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import nbformat

from fasttrain.costs import ACCELERATORS, UTILISATION, load_estimates

from .chapters import code_hash, strip_for_publishing
from .paths import chapters, course_root, source_notebook, tool, tool_env

PAGE_PREFERENCE = (("runs", "full"), ("runs", "cpu"), ("_build/executed", "full"), ("_build/executed", "cpu"),
                   ("_build/executed", "smoke"))
JPEG_CAVEAT = ("The CIFAR-10 copy these runs used was decoded from a JPEG re-encoding of the original images "
               "(quality about 75), so its accuracies are close to, but not the same as, accuracies on the "
               "original test set.")


def repository_url(root: Path) -> str:
    """The course repository's URL, from `repository.url` in _config.yml (the one place it is set)."""
    import yaml

    config = yaml.safe_load((root / "_config.yml").read_text())
    return config["repository"]["url"].rstrip("/")


def repository_branch(root: Path) -> str:
    import yaml

    config = yaml.safe_load((root / "_config.yml").read_text())
    return config["repository"].get("branch", "main")


def launch_links(slug: str, root: Path) -> str:
    """Markdown buttons that open the chapter's STUDENT notebook (course/) in Colab and Binder."""
    owner_repo = repository_url(root).split("github.com/", 1)[-1]
    branch = repository_branch(root)
    path = f"course/{slug}/{slug}.ipynb"
    colab = f"https://colab.research.google.com/github/{owner_repo}/blob/{branch}/{path}"
    binder = f"https://mybinder.org/v2/gh/{owner_repo}/{branch}?labpath={path}"
    # The badges are the course's own files (book/images), so that a page loads nothing from elsewhere.
    return (f"[![Open the assignment in Colab](../images/open-in-colab.svg)]({colab}) "
            f"[![Open the assignment in Binder](../images/launch-binder.svg)]({binder})")


# ---------------------------------------------------------------------------------------------
# Which run a page shows
# ---------------------------------------------------------------------------------------------

def page_source(slug: str, root: Path, prefer: str = "committed") -> Path | None:
    """The executed notebook a chapter page is built from (see PAGE_PREFERENCE); None if the chapter never ran."""
    order = PAGE_PREFERENCE if prefer == "committed" else PAGE_PREFERENCE[2:] + PAGE_PREFERENCE[:2]
    for folder, profile in order:
        path = root / folder / profile / f"{slug}.ipynb"
        if path.is_file():
            return path
    return None


def later_problems(record: dict, results_dir: Path) -> list[dict]:
    """Runs of the same chapter and profile after the shown one that failed, missed a target or never finished."""
    folder = results_dir / record["profile"] / record["chapter"]
    problems = []
    shown = record.get("run_id")
    for path in sorted(folder.glob("*.json")):
        rec = json.loads(path.read_text())
        # Files are named by their run's start to the microsecond (a run id, or <start>-started.json): later
        # than the shown run's id is later, even within the same second (dates are to the second).
        later = path.stem.split("-")[0] > shown if shown else rec.get("date", "") > record["date"]
        if later and rec.get("status") in ("failed", "missed", "running"):
            problems.append(rec)
    return problems


def _header(record: dict, stale: bool, problems: list[dict], root: Path, slug: str) -> str:
    lines = [launch_links(slug, root), "",
             f"*This page shows a recorded run: profile `{record['profile']}` on {record['device']}, "
             f"{record['date'][:10]}, {record['wall_seconds']:.0f} s, torch {record['torch_version']}. Its "
             f"results are on the [results page](../results.md). The exercises' solutions are hidden: open the "
             f"assignment notebook to write them.*"]
    if stale:
        lines += ["", "```{note}\nThis run is older than the chapter's current code: the code cells below are "
                  "shown as they ran, and a new run of the chapter will replace them.\n```"]
    for rec in problems:
        what = {"failed": f"failed ({rec.get('error', 'error')}: {rec.get('message', '')})".strip(),
                "missed": "finished but missed a target", "running": "did not finish"}[rec["status"]]
        lines += ["", f"```{{warning}}\nA later run of this chapter ({rec['profile']} profile, {rec['date'][:10]}) "
                  f"{what}. This page keeps showing the last good run.\n```"]
    return "\n".join(lines)


def _merge_current_prose(nb: nbformat.NotebookNode, source: nbformat.NotebookNode) -> None:
    """Replace the run's markdown by the source's current markdown, cell by cell (ids match); add new prose cells."""
    current = {c.get("id"): c for c in source.cells}
    run_ids = {c.get("id") for c in nb.cells}
    for cell in nb.cells:
        src = current.get(cell.get("id"))
        if cell.cell_type == "markdown" and src is not None:
            cell.source = src.source
    position = {c.get("id"): i for i, c in enumerate(nb.cells)}
    previous = None
    inserts = []
    for cell in source.cells:
        if cell.get("id") not in run_ids and cell.cell_type == "markdown":
            inserts.append((position.get(previous, -1) + 1, cell))
        previous = cell.get("id") if cell.get("id") in run_ids else previous
    for offset, (at, cell) in enumerate(inserts):
        nb.cells.insert(at + offset, nbformat.from_dict(cell))


def _tag(cell, tag: str) -> None:
    tags = cell.metadata.setdefault("tags", [])
    if tag not in tags:
        tags.append(tag)


def book_page(executed: Path, root: Path, results_dir: Path | None = None) -> nbformat.NotebookNode:
    """The book's chapter page for one executed run (see the module's docstring)."""
    from nbgrader.preprocessors import ClearHiddenTests

    from .nbgrader_plugins import ExerciseStubs

    slug = executed.stem
    nb = strip_for_publishing(nbformat.read(str(executed), as_version=4))
    record = nb.metadata.get("fasttrain", {}).get("record")
    if record is None:
        raise ValueError(f"{executed} carries no results record: it was not written by `fasttrain run`")
    source = nbformat.read(str(source_notebook(root, slug)), as_version=4)
    stale = record.get("source_hash") != code_hash(source)
    if not stale:
        _merge_current_prose(nb, source)
    nb, _ = ExerciseStubs().preprocess(nb, {})
    nb, _ = ClearHiddenTests().preprocess(nb, {})
    code_seen = 0
    for cell in nb.cells:
        cell.metadata.pop("nbgrader", None)
        tags = cell.metadata.get("tags", [])
        if "injected-parameters" in tags or "install" in tags:
            _tag(cell, "remove-cell")       # paths of the build machine; the Colab install step
        elif cell.cell_type == "code":
            code_seen += 1
            if "parameters" in tags or "setup" in tags:
                _tag(cell, "hide-input")
    problems = later_problems(record, Path(results_dir or root / "results"))
    note = nbformat.v4.new_markdown_cell(_header(record, stale, problems, root, slug))
    note.id = "recorded-run"
    title_at = 1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0
    nb.cells.insert(title_at, note)
    return nb


# ---------------------------------------------------------------------------------------------
# Generated pages
# ---------------------------------------------------------------------------------------------

def results_page(pages: dict[str, dict]) -> str:
    """The results page (Markdown): one small table per chapter, from the records of the runs the pages show."""
    lines = ["# Results", "",
             "Every chapter run writes a results record; this page is generated by `fasttrain book` from the "
             "records of the runs that the chapter pages show, and nothing in it is typed by hand. The `smoke` "
             "profile proves on a CPU in minutes that the code runs (CI executes it), `cpu` is sized for about "
             "15 minutes a chapter on a 2-core CPU so that the experiments show their effect, and `full` is "
             "the GPU profile with the real targets.", "", JPEG_CAVEAT, ""]
    if not pages:
        lines.append("No recorded runs were found: run `fasttrain run` first.")
        return "\n".join(lines) + "\n"
    for slug, rec in sorted(pages.items()):
        lines += [f"## {slug}", "",
                  f"Profile `{rec['profile']}` on {rec['device']}, {rec['date'][:10]}, {rec['wall_seconds']:.0f} s, "
                  f"torch {rec['torch_version']}.", "",
                  "| metric | value | target | reached |", "| --- | --- | --- | --- |"]
        for m in rec["metrics"]:
            target = "" if m["target"] is None else f"{m['direction']} {m['target']:g}"
            reached = "" if m["passed"] is None else ("yes" if m["passed"] else "**no**")
            lines.append(f"| `{m['metric']}` | {m['value']:.4g} | {target} | {reached} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def estimates_page(root: Path) -> str:
    """The cost estimate of every chapter's full profile (from `fasttrain/estimates.json`), as Markdown."""
    table = load_estimates()
    names = list(ACCELERATORS)
    lines = [f"| chapter | PFLOP | {' | '.join(names)} |", "|---|---|" + "---|" * len(names)]
    totals = {n: 0.0 for n in names}
    for slug in chapters(root):
        entry = table.get(slug, {}).get("full")
        if entry is None:
            lines.append(f"| {slug} | not measured yet |" + " |" * len(names))
            continue
        for n in names:
            totals[n] += entry["seconds"][n]
        cells = " | ".join(f"{entry['seconds'][n] / 60:.1f} min" for n in names)
        lines.append(f"| {slug} | {entry['flops']['total'] / 1e15:.3g} | {cells} |")
    lines.append(f"| **all chapters** | | {' | '.join(f'{totals[n] / 60:.1f} min' for n in names)} |")
    gpus = "; ".join(f"{g.name}: {g.low_precision_tflops:g} TFLOP/s in fp16/bf16, {g.fp32_tflops:g} in fp32, "
                     f"{g.launch_us:g} µs per operator launch" for g in ACCELERATORS.values())
    lines += ["", f"FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` on one step of every loop of "
              f"the full profile's dry run, times the steps the profile plans. Time is the larger of the FLOPs at "
              f"{UTILISATION:.0%} of the GPU's peak and the operator launches at the host's launch cost ({gpus})."]
    return "\n".join(lines) + "\n"


def build_book(root: Path | None = None, strict: bool = True, prefer: str = "committed",
               results_dir: Path | None = None) -> Path:
    """Write book/chapters/*.ipynb, book/results.md and book/generated/, then build the HTML with Jupyter Book."""
    root = course_root(root)
    pages_dir = root / "book" / "chapters"
    if pages_dir.exists():
        shutil.rmtree(pages_dir)
    pages_dir.mkdir(parents=True)
    shown = {}
    for slug in chapters(root):
        executed = page_source(slug, root, prefer)
        if executed is None:
            continue
        nb = book_page(executed, root, results_dir)
        nbformat.write(nb, str(pages_dir / f"{slug}.ipynb"))
        shown[slug] = nb.metadata["fasttrain"]["record"]
    (root / "book" / "results.md").write_text(results_page(shown))
    generated = root / "book" / "generated"
    generated.mkdir(exist_ok=True)
    (generated / "estimates.md").write_text(estimates_page(root))
    cmd = [tool("jupyter-book"), "build", str(root), "--path-output", str(root), "--all"]  # --all: every page's
    # sidebar is rendered anew (an incremental build keeps the old titles of other pages in it)
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    subprocess.run(cmd, check=True, env=tool_env(), cwd=str(root))
    return root / "_build" / "html" / "index.html"
