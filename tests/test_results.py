"""fasttrain.runtime and fasttrain.results: a chapter's run, its settings, its record, its targets."""

import json

import pytest
import torch
import torch.nn as nn

import fasttrain
from fasttrain import runtime
from fasttrain.batches import DeviceLoader
from fasttrain.device import autocast_dtype
from fasttrain.results import TargetMissedError, load_records, load_targets, run_history, targets_for
from fasttrain.runtime import ProfileRefused
from fasttrain.train import Learner
from fasttrain_course.paths import chapters

SLUG = "01_optimizers"


def test_targets_table_is_well_formed_and_every_chapter_has_smoke_cpu_and_full_targets(repo_root):
    targets = load_targets()
    keys = [(t.chapter, t.metric, t.profile) for t in targets]
    assert len(keys) == len(set(keys)), "a (chapter, metric, profile) appears twice in targets.csv"
    for slug in chapters(repo_root):
        for profile in ("smoke", "cpu", "full"):
            assert targets_for(slug, profile), f"{slug} has no {profile} targets"


def start(tmp_path, **kwargs):
    return fasttrain.start(SLUG, **{"profile": "smoke", "device": "cpu", "results_dir": tmp_path, **kwargs})


def test_a_run_records_its_settings_parameters_metrics_and_what_the_results_page_needs(tmp_path):
    run = start(tmp_path, seed=3, parameters={"adam_lr": 1e-3})
    epochs = run.setting("epochs", smoke=5, cpu=20, full=60)
    assert epochs == 5 and run.grading is False and run.threads >= 1
    run.metric("adam_epochs_to_fit_100", 20)
    run.metric("digits_test_accuracy", 0.97)
    run.log("curve", [1.0, 0.5])
    record = run.finish()
    saved = json.loads((tmp_path / "smoke" / f"{SLUG}.json").read_text())
    assert saved == record
    for key in ("chapter", "profile", "device", "metrics", "passed", "wall_seconds", "fasttrain_version",
                "torch_version", "date", "settings", "parameters", "seed", "threads"):
        assert key in saved
    assert saved["settings"] == {"epochs": 5} and saved["parameters"] == {"adam_lr": 1e-3} and saved["seed"] == 3
    assert saved["passed"] is True and saved["status"] == "passed"
    assert {m["metric"]: m["target"] for m in saved["metrics"]} == {"adam_epochs_to_fit_100": 30,
                                                                    "digits_test_accuracy": 0.95}
    assert saved["glue"]["digits_test_accuracy"]["text"] == "0.97"
    assert saved["extra"] == {"curve": [1.0, 0.5]}
    assert load_records(tmp_path)[0]["chapter"] == SLUG
    assert "/" not in json.dumps(saved["settings"]), "no path of the build machine in the settings"


def test_one_setting_name_cannot_take_two_values(tmp_path):
    run = start(tmp_path)
    run.setting("batch", smoke=8, cpu=16, full=64)
    run.setting("batch", smoke=8, cpu=16, full=64)
    with pytest.raises(ValueError, match="already chosen"):
        run.setting("batch", smoke=4, cpu=16, full=64)


def test_a_missed_target_raises_and_never_replaces_the_passing_record(tmp_path):
    good = start(tmp_path)
    good.metric("adam_epochs_to_fit_100", 20)
    good.metric("digits_test_accuracy", 0.97)
    good.finish()
    bad = start(tmp_path)
    bad.metric("adam_epochs_to_fit_100", 20)
    bad.metric("digits_test_accuracy", 0.5)
    with pytest.raises(TargetMissedError, match=r"01_optimizers.*digits_test_accuracy = 0\.5.*>= 0\.95"):
        bad.finish()
    current = json.loads((tmp_path / "smoke" / f"{SLUG}.json").read_text())
    assert current["passed"] is True, "the missed run must not replace the passing record"
    history = run_history(SLUG, "smoke", tmp_path)
    assert [r["status"] for r in history] == ["passed", "missed"], "each run keeps its own record"


def test_a_run_that_reports_no_value_for_a_target_is_an_error(tmp_path):
    run = start(tmp_path)
    run.metric("adam_epochs_to_fit_100", 20)
    with pytest.raises(KeyError, match="digits_test_accuracy"):
        run.finish()


def test_lower_is_better_targets_fail_when_above():
    t = targets_for(SLUG, "smoke")["adam_epochs_to_fit_100"]
    assert t.passed(30) and not t.passed(31) and not t.passed(float("inf")) and not t.passed(float("nan"))


def test_the_full_profile_on_a_cpu_is_refused_with_the_estimate_and_the_way_to_insist(tmp_path):
    with pytest.raises(ProfileRefused) as err:
        start(tmp_path, profile="full")
    text = str(err.value)
    assert "allow_cpu_full" in text and "--dry-run" in text and "profile cpu" in text
    assert "T4" in text or "No cost estimate" in text
    run = start(tmp_path, profile="full", allow_cpu_full=True)
    assert run.profile == "full"


def test_graded_runs_write_no_record(tmp_path, monkeypatch):
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    run = start(tmp_path)
    assert run.grading is True
    assert run.finish() is None
    assert not list(tmp_path.rglob("*.json"))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_a_dry_run_cuts_every_loop_forces_autocast_and_counts_the_cost(tmp_path, dtype):
    run = start(tmp_path, profile="full", dry_run=dtype)
    try:
        assert autocast_dtype("cpu") == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        x, y = torch.randn(512, 8), torch.randint(0, 3, (512,))
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        lrn = Learner(model, DeviceLoader(x, y, 32), DeviceLoader(x, y, 64, shuffle=False), mixed_precision=True)
        history = lrn.fit(10)
        assert len(history) == runtime.DRY_EPOCHS and lrn.n_steps == runtime.DRY_EPOCHS * runtime.DRY_STEPS
        assert (lrn.step.scaler is not None) == (dtype == "fp16")
        steps = list(run.steps(1000, "custom loop"))
        assert steps == list(range(runtime.DRY_STEPS))
        for name in ("adam_epochs_to_fit_100", "digits_test_accuracy"):
            run.metric(name, 0.0)   # nonsense values: a dry run's numbers are never judged
        record = run.finish()
    finally:
        runtime.force_autocast_dtype(None)
    assert record["dry_run"] == dtype and record["passed"] is None and record["status"] == "dry run"
    assert (tmp_path / "dry-run" / f"full-{dtype}" / f"{SLUG}.json").is_file()
    assert not (tmp_path / "full").exists(), "a dry run never counts as a result"
    entries = {e["name"]: e for e in record["cost"]["entries"]}
    train = entries["fit"]
    assert train["planned_steps"] == 10 * 16 and train["planned_samples"] == 10 * 512
    # forward 2B(8*16 + 16*3); backward: both weight gradients, and the input gradient of the second layer only
    # fp16 on a CPU is slow enough that its dry run keeps only a few samples of each batch (and says so)
    batch = 32 if dtype == "bf16" else runtime.DRY_FP16_CPU_SAMPLES
    assert record["dry_run_samples_per_batch"] == (None if dtype == "bf16" else runtime.DRY_FP16_CPU_SAMPLES)
    assert train["flops_per_step"] == 2 * batch * (2 * (8 * 16 + 16 * 3) + 16 * 3)
    assert entries["fit (validation)"]["planned_steps"] == 10 * 8
    assert record["cost"]["flops"]["total"] > 0 and set(record["cost"]["seconds"]) >= {"T4", "A100", "H100", "CPU"}
    assert autocast_dtype("cpu") is None, "finishing a dry run undoes the forced autocast"
