"""Shared by the dry-run tests (one file per profile and dtype, so that pytest-xdist shares them out).

Every chapter's full (and cpu) profile runs end to end on the CPU for a few steps per loop, in bf16 and in fp16.

The dry run keeps the profile's models, widths, memory formats, schedules and data, cuts every
loop to a few steps, checks every loss is finite (a non-finite one raises), and counts the cost
of one step of every loop. Its records never count as results.
"""

from chapters import execute_chapter
from fasttrain_course.estimates import CHAPTER_BUDGET


def check_dry_run(slug: str, profile: str, dtype: str) -> None:
    """Dry-run `slug` in `profile` with autocast in `dtype`; check its record and, for the full profile, the budget."""
    _, record = execute_chapter(slug, profile, dry_run=dtype)
    assert record["dry_run"] == dtype and record["status"] == "dry run" and record["passed"] is None
    assert record["profile"] == profile
    cost = record["cost"]
    assert cost["flops"]["train"] > 0, "the dry run counted no training step"
    if profile == "full":
        gpu, limit = CHAPTER_BUDGET
        assert cost["seconds"][gpu] <= limit, (
            f"{slug}'s full profile is estimated at {cost['seconds'][gpu] / 60:.1f} min on a {gpu}: over the "
            f"{limit / 60:.0f}-minute budget")
