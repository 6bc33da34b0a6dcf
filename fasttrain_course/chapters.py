"""Run chapters with papermill, keep each run's notebook and record, and publish the best runs for the book.

A run's executed notebook is written to `_build/executed/<profile>/<slug>.ipynb` only when the run
succeeded (atomically, with the run's results record inside its metadata), so a failed or
interrupted run never replaces the last good one. A failed run leaves `<slug>.failed.ipynb` beside
it and a record with status "failed" in the run history; a run that was killed leaves its
"running" record there, which the book reports as a run that did not finish.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat

from fasttrain.files import atomic_write, write_json_atomically
from fasttrain.runtime import RECORD_OUT_ENV, SOURCE_HASH_ENV, source_hash

from .paths import course_root, source_notebook

WIDGET_MIMES = ("application/vnd.jupyter.widget-view+json", "application/vnd.jupyter.widget-state+json")
# Warnings about the machine a run happened on, not about the chapter: where its data cache lives and that it was
# rebuilt. They name the machine's paths, and the book would show them to every reader.
MACHINE_WARNINGS = ("CacheStaleWarning",)
# A warning as Python prints it: "file:line: Category: message" and, indented, the line of source that raised it.
_WARNING_BLOCK = re.compile(r"^\S[^\n]*:\d+: (\w+): [^\n]*\n(?:[ \t]+[^\n]*\n?)?", re.MULTILINE)


def _without_machine_warnings(text: str) -> str:
    return _WARNING_BLOCK.sub(lambda m: "" if m.group(1) in MACHINE_WARNINGS else m.group(0), text)


class ChapterRunFailed(RuntimeError):
    """A chapter's notebook raised (a cell failed, or a target was missed)."""


@dataclass
class Outcome:
    slug: str
    notebook: Path
    record: dict
    seconds: float


def run_folder(profile: str, dry_run: bool | str = False) -> str:
    """`smoke`, `cpu`, `full`, or `dry-run/<profile>-<dtype>` for a dry run (the same layout as results/)."""
    if dry_run:
        return f"dry-run/{profile}-{'bf16' if dry_run is True else dry_run}"
    return profile


def code_hash(nb: nbformat.NotebookNode) -> str:
    """The hash of a notebook's code cells (what a record says it ran)."""
    return source_hash([c.source for c in nb.cells if c.cell_type == "code"])


def write_notebook_atomically(nb: nbformat.NotebookNode, path: Path) -> None:
    atomic_write(path, lambda tmp: nbformat.write(nb, tmp))


@contextlib.contextmanager
def _environment(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _failure(exc: BaseException, nb_path: Path) -> dict:
    """What went wrong: the error's name and message, and which cell raised it."""
    info = {"error": type(exc).__name__, "message": str(exc).strip().splitlines()[-1][:500] if str(exc).strip() else ""}
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:
        info.update(error=ename, message=str(evalue)[:500])
    if nb_path.exists():
        nb = nbformat.read(str(nb_path), as_version=4)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code" and any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
                info["cell"] = i
                info["cells_run"] = sum(1 for c in nb.cells if c.cell_type == "code" and c.get("execution_count"))
                break
    return info


def run_chapter(slug: str, profile: str = "smoke", root: Path | None = None, out_dir: Path | None = None,
                results_dir: Path | None = None, parameters: dict | None = None, dry_run: bool | str = False,
                allow_cpu_full: bool = False) -> Outcome:
    """Execute one chapter's source notebook with papermill; keep its notebook only if it succeeded."""
    import papermill

    root = course_root(root)
    out_dir = Path(out_dir or root / "_build" / "executed")
    results_dir = Path(results_dir or root / "results").resolve()
    folder = run_folder(profile, dry_run)
    source = source_notebook(root, slug)
    digest = code_hash(nbformat.read(str(source), as_version=4))
    target = out_dir / folder / f"{slug}.ipynb"
    failed_copy = target.with_name(f"{slug}.failed.ipynb")
    target.parent.mkdir(parents=True, exist_ok=True)

    started = _dt.datetime.now(_dt.timezone.utc)
    marker = results_dir / folder / slug / f"{started.strftime('%Y%m%dT%H%M%S%fZ')}-started.json"
    write_json_atomically(marker, {"chapter": slug, "profile": profile, "dry_run": dry_run, "status": "running",
                                   "date": started.isoformat(timespec="seconds"), "source_hash": digest})
    params = {"profile": profile, "results_dir": str(results_dir), "dry_run": dry_run,
              "allow_cpu_full": allow_cpu_full, **(parameters or {})}
    fd, record_out = tempfile.mkstemp(prefix=f"{slug}-record-", suffix=".json")
    os.close(fd)
    os.remove(record_out)
    partial = target.with_name(f".{slug}.running.ipynb")
    start = time.perf_counter()
    try:
        with _environment(**{SOURCE_HASH_ENV: digest, RECORD_OUT_ENV: record_out}):
            papermill.execute_notebook(str(source), str(partial), parameters=params, kernel_name="python3",
                                       cwd=str(source.parent), progress_bar=False)
    except BaseException as exc:
        seconds = time.perf_counter() - start
        info = _failure(exc, partial)
        if partial.exists():
            os.replace(partial, failed_copy)
        record = json.loads(Path(record_out).read_text()) if os.path.exists(record_out) else None
        if record is not None and record.get("status") == "missed":
            marker.unlink(missing_ok=True)  # the run's own record (status "missed") is in the history
        else:
            write_json_atomically(marker, {"chapter": slug, "profile": profile, "dry_run": dry_run,
                                           "status": "failed", "date": started.isoformat(timespec="seconds"),
                                           "source_hash": digest, "wall_seconds": round(seconds, 1), **info})
        with contextlib.suppress(OSError):
            os.remove(record_out)
        if isinstance(exc, KeyboardInterrupt):
            raise
        where = f" in cell {info['cell']}" if "cell" in info else ""
        raise ChapterRunFailed(f"{slug} ({folder}) failed{where}: {info['error']}: {info['message']}") from exc
    seconds = time.perf_counter() - start
    if not os.path.exists(record_out):
        raise ChapterRunFailed(f"{slug} ran but never called run.finish(), so it wrote no results record")
    record = json.loads(Path(record_out).read_text())
    os.remove(record_out)
    nb = nbformat.read(str(partial), as_version=4)
    nb.metadata["fasttrain"] = {"record": record}
    write_notebook_atomically(nb, target)
    partial.unlink(missing_ok=True)
    failed_copy.unlink(missing_ok=True)
    marker.unlink(missing_ok=True)
    return Outcome(slug, target, record, seconds)


def strip_for_publishing(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """An executed notebook as the book keeps it: outputs, without widget state or widget views, without
    the warnings that only describe the machine it ran on (MACHINE_WARNINGS), and without the repr of the record
    that the last cell's `run.finish()` returns (its printed results table stays)."""
    nb = nbformat.from_dict(nb)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        ends_the_run = cell.source.strip().endswith("run.finish()")
        for out in cell.get("outputs", []):
            if ends_the_run and out.get("output_type") == "execute_result":
                continue  # the record's repr: the results table printed above it shows the record
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                out["text"] = _without_machine_warnings(out["text"])
                if not out["text"].strip():
                    continue
            data = out.get("data", {})
            if any(m in data for m in WIDGET_MIMES):
                data = {k: v for k, v in data.items() if k not in WIDGET_MIMES and k != "text/plain"}
                if not data:
                    continue
                out["data"] = data
            kept.append(out)
        cell.outputs = kept
    return nb


def publish(slug: str, profile: str, root: Path | None = None, out_dir: Path | None = None) -> Path:
    """Copy the last good executed run of `slug` in `profile` to runs/<profile>/, where the book reads it."""
    root = course_root(root)
    executed = Path(out_dir or root / "_build" / "executed") / profile / f"{slug}.ipynb"
    if not executed.is_file():
        raise FileNotFoundError(f"No successful {profile} run of {slug} to publish: run `fasttrain run {slug} "
                                f"--profile {profile}` first")
    nb = strip_for_publishing(nbformat.read(str(executed), as_version=4))
    record = nb.metadata["fasttrain"]["record"]
    if record.get("dry_run") or record.get("passed") is not True:
        raise ValueError(f"{executed} is not a passing run: only runs that reached their targets are published")
    dest = root / "runs" / profile / f"{slug}.ipynb"
    write_notebook_atomically(nb, dest)
    write_json_atomically(dest.with_suffix(".json"), record)
    return dest
