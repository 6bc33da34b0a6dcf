"""Targets (one table for notebooks, tests and the book) and the JSON results records of runs.

Every run keeps its own record, `results/<profile>/<chapter>/<time>.json`; beside them,
`results/<profile>/<chapter>.json` is the latest run that passed its targets, and only a passing
run replaces it. Dry runs go under `results/dry-run/<profile>-<dtype>/` and never count as results.
Every file is written atomically (a temporary file, then a rename), so an interrupted run leaves
no half-written record.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import __version__
from .device import device_name
from .files import write_json_atomically  # noqa: F401  (re-exported for the tooling)

if TYPE_CHECKING:
    from .runtime import Run

TARGETS_CSV = Path(__file__).with_name("targets.csv")
TARGET_PROFILES = ("smoke", "cpu", "full")


class TargetMissedError(AssertionError):
    """A run finished but one of its targets was not reached."""


@dataclass(frozen=True)
class Target:
    chapter: str
    metric: str
    profile: str
    direction: str  # ">=" (higher is better) or "<=" (lower is better)
    target: float
    meaning: str

    def passed(self, value: float) -> bool:
        """Whether `value` meets this target."""
        if value != value:  # NaN never passes
            return False
        return value >= self.target if self.direction == ">=" else value <= self.target


def load_targets(path: Path | str = TARGETS_CSV) -> list[Target]:
    """Read the targets table."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    targets = []
    for line, row in enumerate(rows, start=2):
        if None in row or any(v is None for v in row.values()):
            raise ValueError(f"{path}, line {line}: expected 6 fields (quote a meaning that holds commas): {row}")
        if row["direction"] not in (">=", "<="):
            raise ValueError(f"{path}, line {line}: direction must be '>=' or '<=', got {row['direction']!r}")
        if row["profile"] not in TARGET_PROFILES:
            raise ValueError(f"{path}, line {line}: profile must be one of {TARGET_PROFILES}, got {row['profile']!r}")
        targets.append(Target(row["chapter"], row["metric"], row["profile"], row["direction"],
                              float(row["target"]), row["meaning"]))
    return targets


def targets_for(chapter: str, profile: str) -> dict[str, Target]:
    """The targets of one chapter in one profile, by metric name."""
    found = {t.metric: t for t in load_targets() if t.chapter == chapter and t.profile == profile}
    if not found:
        raise KeyError(f"No targets for chapter {chapter!r} in profile {profile!r} in {TARGETS_CSV}")
    return found


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------

def build_record(run: "Run") -> dict:
    """The results record of a finished run: its metrics against the targets, settings, costs, versions."""
    targets = targets_for(run.chapter, run.profile)
    missing = sorted(set(targets) - set(run.metrics))
    if missing:
        raise KeyError(f"Chapter {run.chapter!r} has {run.profile} targets for {missing} but the run reported no "
                       f"value for them (call run.metric(name, value) where the value is measured)")
    judged = not run.dry_run
    metrics = []
    for name, value in run.metrics.items():
        t = targets.get(name)
        metrics.append({
            "metric": name,
            "value": value,
            "target": None if t is None else t.target,
            "direction": None if t is None else t.direction,
            "passed": None if t is None or not judged else t.passed(value),
            "meaning": None if t is None else t.meaning,
        })
    verdicts = [m["passed"] for m in metrics if m["passed"] is not None]
    passed = all(verdicts) if judged else None
    now = _dt.datetime.now(_dt.timezone.utc)
    record = {
        "chapter": run.chapter,
        "profile": run.profile,
        "dry_run": run.dry_run,
        "status": "dry run" if not judged else ("passed" if passed else "missed"),
        "passed": passed,
        "device": device_name(run.device),
        "threads": run.threads,
        "seed": run.seed,
        "metrics": metrics,
        "parameters": run.parameters,
        "settings": run.settings,
        "dry_run_overrides": run.dry_overrides,
        "dry_run_samples_per_batch": run.dry_samples_per_batch,
        "glue": run.glued,
        "extra": run.extra,
        "wall_seconds": round(run.wall_seconds, 2),
        "source_hash": os.environ.get("FASTTRAIN_SOURCE_HASH"),
        "fasttrain_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "date": now.isoformat(timespec="seconds"),
        "run_id": now.strftime("%Y%m%dT%H%M%S%fZ"),
    }
    if run.meters:
        from .costs import summarize_meters

        record["cost"] = summarize_meters(run.meters, run.dry_overrides)
    return record


def profile_folder(record: dict) -> str:
    """`<profile>` for a real run, `dry-run/<profile>-<dtype>` for a dry run."""
    if record.get("dry_run"):
        return f"dry-run/{record['profile']}-{record['dry_run']}"
    return record["profile"]


def save_record(record: dict, results_dir: Path | str = "results") -> Path:
    """Keep the record in the run history; make it the chapter's current record if it passed (or is a dry run)."""
    folder = Path(results_dir) / profile_folder(record)
    history = folder / record["chapter"] / f"{record['run_id']}.json"
    write_json_atomically(history, record)
    if record["passed"] is not False:
        write_json_atomically(folder / f"{record['chapter']}.json", record)
    return history


def print_record(record: dict) -> None:
    """The run's metrics against their targets, as a small table (no file paths)."""
    kind = f"dry run ({record['dry_run']}) of the {record['profile']} profile" if record["dry_run"] \
        else f"{record['profile']} profile"
    print(f"Results of {record['chapter']} ({kind} on {record['device']}, {record['wall_seconds']:.1f} s):")
    for m in record["metrics"]:
        mark = "" if m["passed"] is None else ("  reached" if m["passed"] else "  MISSED")
        tgt = "" if m["target"] is None else f"  (target {m['direction']} {m['target']:g})"
        print(f"  {m['metric']:<34} {m['value']:.4g}{tgt}{mark}")
    if record["dry_run"]:
        print("A dry run checks that every code path runs; its numbers are not results.")


def check_targets(record: dict) -> None:
    """Raise TargetMissedError naming chapter, metric, value and target for every missed target."""
    missed = [m for m in record["metrics"] if m["passed"] is False]
    if missed:
        lines = [f"chapter {record['chapter']} ({record['profile']} profile): {m['metric']} = {m['value']:.4g}, "
                 f"target {m['direction']} {m['target']:.4g}" for m in missed]
        raise TargetMissedError("Target missed:\n  " + "\n  ".join(lines))


def load_records(results_dir: Path | str = "results", dry_runs: bool = False) -> list[dict]:
    """The current record of every chapter and profile under `results_dir` (dry runs only if asked)."""
    root = Path(results_dir)
    pattern = "dry-run/*/*.json" if dry_runs else "*/*.json"
    records = []
    for path in sorted(root.glob(pattern)):
        rec = json.loads(path.read_text())
        if bool(rec.get("dry_run")) != dry_runs:
            continue
        records.append(rec)
    return sorted(records, key=lambda r: (r["chapter"], r["profile"], str(r.get("dry_run"))))


def run_history(chapter: str, profile: str, results_dir: Path | str = "results") -> list[dict]:
    """Every record kept of `chapter` in `profile`, oldest first."""
    folder = Path(results_dir) / profile / chapter
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
