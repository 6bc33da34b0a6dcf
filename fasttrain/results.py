"""Targets (one table for notebooks, tests and the book) and the JSON results record of a run."""

from __future__ import annotations

import csv
import datetime as _dt
import json
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .device import device_name

TARGETS_CSV = Path(__file__).with_name("targets.csv")


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
            raise ValueError(f"{path}: direction must be '>=' or '<=', got {row['direction']!r} in {row}")
        targets.append(Target(row["chapter"], row["metric"], row["profile"], row["direction"],
                              float(row["target"]), row["meaning"]))
    return targets


def targets_for(chapter: str, profile: str) -> dict[str, Target]:
    """The targets of one chapter in one profile, by metric name."""
    found = {t.metric: t for t in load_targets() if t.chapter == chapter and t.profile == profile}
    if not found:
        raise KeyError(f"No targets for chapter {chapter!r} in profile {profile!r} in {TARGETS_CSV}")
    return found


def write_record(chapter: str, profile: str, device: torch.device | str, values: dict[str, float],
                 wall_seconds: float, results_dir: Path | str = "results", extra: dict | None = None) -> dict:
    """Write `<results_dir>/<profile>/<chapter>.json` comparing `values` with the chapter's targets."""
    targets = targets_for(chapter, profile)
    missing = sorted(set(targets) - set(values))
    if missing:
        raise KeyError(f"Chapter {chapter!r} has targets for {missing} but the run reported no value for them")
    metrics = []
    for name, value in values.items():
        t = targets.get(name)
        metrics.append({
            "metric": name,
            "value": float(value),
            "target": None if t is None else t.target,
            "direction": None if t is None else t.direction,
            "passed": None if t is None else t.passed(float(value)),
            "meaning": None if t is None else t.meaning,
        })
    record = {
        "chapter": chapter,
        "profile": profile,
        "device": device_name(device),
        "metrics": metrics,
        "passed": all(m["passed"] for m in metrics if m["passed"] is not None),
        "wall_seconds": round(float(wall_seconds), 2),
        "fasttrain_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        record["extra"] = extra
    out = Path(results_dir) / profile / f"{chapter}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    record["path"] = str(out)
    return record


def check_targets(record: dict) -> None:
    """Raise TargetMissedError naming chapter, metric, value and target for every missed target."""
    missed = [m for m in record["metrics"] if m["passed"] is False]
    if missed:
        lines = [f"chapter {record['chapter']} ({record['profile']} profile): {m['metric']} = {m['value']:.4g}, "
                 f"target {m['direction']} {m['target']:.4g}" for m in missed]
        raise TargetMissedError("Target missed:\n  " + "\n  ".join(lines))


def finish_run(chapter: str, profile: str, device: torch.device | str, values: dict[str, float],
               wall_seconds: float, results_dir: Path | str = "results", extra: dict | None = None) -> dict:
    """Write the run's results record, print it as a table, then raise if a target was missed."""
    record = write_record(chapter, profile, device, values, wall_seconds, results_dir, extra)
    print(f"Results of {chapter} ({profile} profile on {record['device']}, {record['wall_seconds']:.1f} s):")
    for m in record["metrics"]:
        mark = "" if m["passed"] is None else ("  reached" if m["passed"] else "  MISSED")
        tgt = "" if m["target"] is None else f"  (target {m['direction']} {m['target']:g})"
        print(f"  {m['metric']:<32} {m['value']:.4g}{tgt}{mark}")
    print(f"Record written to {record['path']}")
    check_targets(record)
    return record


def load_records(results_dir: Path | str = "results") -> list[dict]:
    """Every results record under `results_dir`, sorted by chapter then profile."""
    records = []
    for path in sorted(Path(results_dir).glob("*/*.json")):
        rec = json.loads(path.read_text())
        rec["path"] = str(path)
        records.append(rec)
    return sorted(records, key=lambda r: (r["chapter"], r["profile"]))
