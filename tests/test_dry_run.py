"""Every chapter's full profile in bf16 (the estimate's run) runs end to end on the CPU, a few steps per loop (tests/dry_runs.py)."""

import pytest

from conftest import ROOT
from dry_runs import check_dry_run
from fasttrain_course.paths import chapters


@pytest.mark.parametrize("slug", chapters(ROOT))
def test_dry_run_runs_every_code_path_and_measures_its_cost(slug):
    check_dry_run(slug, "full", "bf16")
