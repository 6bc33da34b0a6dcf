"""The committed cost table of the full profiles is what the dry runs measure, and it fits the budget.

`fasttrain/estimates.json` is what a chapter's refusal on a CPU and the book's setup page show;
it must agree with the dry runs of the current code (`fasttrain estimate --write` refreshes it).
"""

import pytest

from chapters import execute_chapter
from conftest import ROOT
from fasttrain.costs import load_estimates
from fasttrain_course.estimates import CHAPTER_BUDGET, COURSE_BUDGET, over_budget
from fasttrain_course.paths import chapters


def test_every_chapter_has_a_committed_estimate_that_fits_the_budget():
    table = load_estimates()
    missing = [slug for slug in chapters(ROOT) if "full" not in table.get(slug, {})]
    assert not missing, f"no estimate for {missing}: run the dry runs, then `fasttrain estimate --write`"
    costs = {slug: table[slug]["full"] for slug in chapters(ROOT)}
    assert over_budget(costs) == [], (f"over budget ({CHAPTER_BUDGET[1] / 60:.0f} min a chapter on a {CHAPTER_BUDGET[0]}, "
                                      f"{COURSE_BUDGET[1] / 60:.0f} min for all on an {COURSE_BUDGET[0]}): "
                                      f"{over_budget(costs)}")


@pytest.mark.parametrize("slug", chapters(ROOT))
def test_the_committed_estimate_matches_the_dry_run_of_the_current_code(slug):
    committed = load_estimates().get(slug, {}).get("full")
    assert committed is not None, f"{slug} has no committed estimate"
    _, record = execute_chapter(slug, "full", dry_run="bf16")
    measured = record["cost"]
    assert measured["flops"]["total"] == pytest.approx(committed["flops"]["total"], rel=0.05), (
        f"{slug}: the dry run measures {measured['flops']['total']:.3g} FLOPs, the table says "
        f"{committed['flops']['total']:.3g}: run `fasttrain estimate --write` after the dry runs")
    for gpu in ("T4", "A100", "H100"):
        assert measured["seconds"][gpu] == pytest.approx(committed["seconds"][gpu], rel=0.1)
