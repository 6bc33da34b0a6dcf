"""The cost of each chapter's full profile: FLOPs and estimated GPU time, from the records of its dry runs.

`fasttrain run --profile full --dry-run` counts them; `fasttrain estimate --write` copies them into
`fasttrain/estimates.json`, the committed table that the book's setup page and a chapter's
refusal to start its full profile on a CPU read.
"""

from __future__ import annotations

import json
from pathlib import Path

from fasttrain.costs import ACCELERATORS, ESTIMATES_JSON, load_estimates
from fasttrain.results import write_json_atomically

from .paths import chapters

# The budget every full profile must fit (design.md): a chapter on a T4, the whole course on an H100.
CHAPTER_BUDGET = ("T4", 15 * 60)
COURSE_BUDGET = ("H100", 10 * 60)


def measured(root: Path, profile: str = "full") -> dict:
    """{chapter: cost} from the latest dry-run record of each chapter (bf16 preferred, else fp16)."""
    found = {}
    for slug in chapters(root):
        for dtype in ("bf16", "fp16"):
            path = root / "results" / "dry-run" / f"{profile}-{dtype}" / f"{slug}.json"
            if path.is_file():
                record = json.loads(path.read_text())
                if "cost" in record:
                    found[slug] = {"flops": record["cost"]["flops"], "seconds": record["cost"]["seconds"],
                                   "measured": record["date"][:10], "dry_run": dtype}
                    break
    return found


def table(costs: dict) -> str:
    names = list(ACCELERATORS)
    lines = [f"{'chapter':<22}{'PFLOP':>9}" + "".join(f"{n + ' min':>11}" for n in names)]
    totals = dict.fromkeys(names, 0.0)
    for slug, c in sorted(costs.items()):
        for n in names:
            totals[n] += c["seconds"][n]
        lines.append(f"{slug:<22}{c['flops']['total'] / 1e15:>9.3g}" +
                     "".join(f"{c['seconds'][n] / 60:>11.2f}" for n in names))
    lines.append(f"{'all chapters':<22}{'':>9}" + "".join(f"{totals[n] / 60:>11.2f}" for n in names))
    return "\n".join(lines)


def over_budget(costs: dict) -> list[str]:
    """What breaks the budget: chapters over 15 min on a T4, the course over 10 min on an H100."""
    gpu, limit = CHAPTER_BUDGET
    problems = [f"{slug}: {c['seconds'][gpu] / 60:.1f} min on a {gpu} (budget {limit / 60:.0f})"
                for slug, c in costs.items() if c["seconds"][gpu] > limit]
    gpu, limit = COURSE_BUDGET
    total = sum(c["seconds"][gpu] for c in costs.values())
    if total > limit:
        problems.append(f"all chapters: {total / 60:.1f} min on an {gpu} (budget {limit / 60:.0f})")
    return problems


def main(root: Path, write: bool = False) -> int:
    costs = measured(root)
    committed = {slug: v["full"] for slug, v in load_estimates().items() if "full" in v}
    source = "dry-run records"
    if not costs:
        costs, source = committed, f"{ESTIMATES_JSON.name} (no dry-run records here)"
    elif write and set(committed) - set(costs):
        # A chapter with no dry-run record here keeps its committed entry, so one chapter can be refreshed alone.
        kept = sorted(set(committed) - set(costs))
        costs = {**{slug: committed[slug] for slug in kept}, **costs}
        source += f" ({', '.join(kept)}: the committed {ESTIMATES_JSON.name}, no dry-run record of theirs here)"
    if not costs:
        print("No estimate yet: run `fasttrain run --profile full --dry-run` first.")
        return 1
    print(f"Full profile, from {source}:")
    print(table(costs))
    problems = over_budget(costs)
    print("Over budget: " + "; ".join(problems) if problems else
          "Every chapter fits 15 min on a T4, and the course fits 10 min on an H100.")
    if write:
        write_json_atomically(ESTIMATES_JSON, {slug: {"full": c} for slug, c in sorted(costs.items())})
        print(f"wrote {ESTIMATES_JSON}")
    return 0
