"""fasttrain.results: the targets table and the results records."""

import json

import pytest

from fasttrain.course import chapters
from fasttrain.results import (TargetMissedError, finish_run, load_records, load_targets, targets_for,
                               write_record)


def test_targets_table_is_well_formed_and_every_chapter_has_smoke_and_full_targets(repo_root):
    targets = load_targets()
    keys = [(t.chapter, t.metric, t.profile) for t in targets]
    assert len(keys) == len(set(keys)), "a (chapter, metric, profile) appears twice in targets.csv"
    for slug in chapters(repo_root):
        assert targets_for(slug, "smoke"), f"{slug} has no smoke targets"
        assert targets_for(slug, "full"), f"{slug} has no full targets"


def test_record_has_what_the_results_page_needs(tmp_path):
    rec = write_record("01_optimizers", "smoke", "cpu", {"adam_epochs_to_fit_100": 20, "digits_test_accuracy": 0.97},
                       12.3, tmp_path)
    saved = json.loads((tmp_path / "smoke" / "01_optimizers.json").read_text())
    for key in ("chapter", "profile", "device", "metrics", "passed", "wall_seconds", "fasttrain_version",
                "torch_version", "date"):
        assert key in saved
    assert saved["passed"] is True and rec["passed"] is True
    assert {m["metric"]: m["target"] for m in saved["metrics"]} == {"adam_epochs_to_fit_100": 30,
                                                                    "digits_test_accuracy": 0.95}
    assert load_records(tmp_path)[0]["chapter"] == "01_optimizers"


def test_missed_target_raises_naming_chapter_metric_value_and_target(tmp_path):
    with pytest.raises(TargetMissedError, match=r"01_optimizers.*digits_test_accuracy = 0\.5.*>= 0\.95"):
        finish_run("01_optimizers", "smoke", "cpu", {"adam_epochs_to_fit_100": 20, "digits_test_accuracy": 0.5},
                   1.0, tmp_path)
    saved = json.loads((tmp_path / "smoke" / "01_optimizers.json").read_text())
    assert saved["passed"] is False, "the record of a failed run is still written"


def test_lower_is_better_targets_fail_when_above():
    t = targets_for("01_optimizers", "smoke")["adam_epochs_to_fit_100"]
    assert t.passed(30) and not t.passed(31) and not t.passed(float("inf")) and not t.passed(float("nan"))


def test_a_run_that_reports_no_value_for_a_target_is_an_error(tmp_path):
    with pytest.raises(KeyError, match="digits_test_accuracy"):
        write_record("01_optimizers", "smoke", "cpu", {"adam_epochs_to_fit_100": 20}, 1.0, tmp_path)
