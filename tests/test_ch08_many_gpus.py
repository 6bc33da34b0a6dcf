"""Chapter 8 (bigger batches and many GPUs): the exercises' grading with real nbgrader, the smoke run, the dry run's costs."""

import pytest

from chapters import execute_chapter
from grading import grade_variants, solution_source

SLUG = "08_many_gpus"
TESTS = {"test_accumulation_matches_large_batch": 2, "test_accumulation_bookkeeping": 2,
         "test_average_gradients": 2, "test_average_gradients_like_ddp": 2}


def _edits(grade_id: str, *pairs: tuple[str, str]) -> dict[str, str]:
    """A wrong variant of solution cell `grade_id`: each `old` (which must occur) replaced by its `new`."""
    src = solution_source(SLUG, grade_id)
    for old, new in pairs:
        assert old in src, f"{old!r} not found in the solution of {grade_id}: update this test"
        src = src.replace(old, new)
    return {grade_id: src}


SCALE = "        part = loss * share\n        (step.scaler.scale(part) if step.scaler is not None else part).backward()\n"
ZERO = "    step.optimizer.zero_grad(set_to_none=True)\n"
REDUCE = "            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)\n            p.grad /= world\n"
WRONG = {
    # Each micro-batch's mean loss backpropagated as it is: the gradient is k times too large.
    "no_loss_scaling": _edits("accumulation_step", ("part = loss * share", "part = loss")),
    # Every micro-batch weighted 1/k: wrong when they differ in size (the last batch of an epoch often does).
    "equal_shares": _edits("accumulation_step", ("share = len(yb) / total", "share = 1 / len(micro_batches)")),
    # The gradients cleared before every micro-batch: only the last one counts.
    "zero_grad_per_micro_batch": _edits("accumulation_step", ("        _, loss = step.forward(xb, yb)\n",
                                                              "    " + ZERO + "        _, loss = step.forward(xb, yb)\n")),
    # The gradients never cleared: the previous update's gradients leak into this one.
    "no_zero_grad": _edits("accumulation_step", (ZERO, "")),
    # One backward of the summed loss: the right gradient, but every micro-batch's activations kept at once.
    "one_backward_for_all": _edits("accumulation_step", ("    mean_loss = 0.0\n", "    mean_loss, summed = 0.0, 0.0\n"),
                                   (SCALE, "        summed = summed + loss * share\n"),
                                   ("    step.update()", "    summed.backward()\n    step.update()")),
    # The all-reduce sums: without the division every gradient is world_size times the average.
    "sum_without_dividing": _edits("average_gradients", ("            p.grad /= world\n", "")),
    # Written for two GPUs: right with 2 processes, wrong with 3.
    "divide_by_two": _edits("average_gradients", ("p.grad /= world", "p.grad /= 2")),
    # The all-reduce of a copy: the sum lands in the copy and .grad keeps the local gradient.
    "reduce_a_copy": _edits("average_gradients", (REDUCE, "            g = p.grad.clone()\n"
                                                          "            dist.all_reduce(g, op=dist.ReduceOp.SUM)\n"
                                                          "            g /= world\n")),
    # No check for parameters without a gradient: a layer the forward pass did not use breaks it.
    "no_none_check": _edits("average_gradients", ("        if p.grad is not None:\n" + REDUCE,
                                                  "        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)\n"
                                                  "        p.grad /= world\n")),
    # The weights averaged instead of the gradients (they are the same on every process already).
    "averages_weights": _edits("average_gradients", (REDUCE, "            dist.all_reduce(p.data, op=dist.ReduceOp.SUM)\n"
                                                             "            p.data /= world\n")),
}
LOSES = [
    ("no_loss_scaling", "test_accumulation_matches_large_batch"),
    ("equal_shares", "test_accumulation_matches_large_batch"),
    ("equal_shares", "test_accumulation_bookkeeping"),
    ("zero_grad_per_micro_batch", "test_accumulation_matches_large_batch"),
    ("no_zero_grad", "test_accumulation_matches_large_batch"),
    ("no_zero_grad", "test_accumulation_bookkeeping"),
    ("one_backward_for_all", "test_accumulation_bookkeeping"),
    ("sum_without_dividing", "test_average_gradients"),
    ("sum_without_dividing", "test_average_gradients_like_ddp"),
    ("divide_by_two", "test_average_gradients"),
    ("divide_by_two", "test_average_gradients_like_ddp"),
    ("reduce_a_copy", "test_average_gradients"),
    ("reduce_a_copy", "test_average_gradients_like_ddp"),
    ("no_none_check", "test_average_gradients"),
    ("averages_weights", "test_average_gradients"),
    ("averages_weights", "test_average_gradients_like_ddp"),
]


@pytest.fixture(scope="module")
def scores():
    return grade_variants(SLUG, WRONG, timeout=120)


def test_solution_gets_full_marks_and_the_log_reports_no_tampering(scores):
    assert scores["solution"]["total"] == scores["solution"]["max"] == sum(TESTS.values())
    assert "has changed" not in scores.log and "Tampering" not in scores.log, scores.log[-2000:]


def test_blank_student_copy_scores_zero(scores):
    assert scores["blank"]["total"] == 0


@pytest.mark.parametrize("variant,test_id", LOSES, ids=[f"{v}-{t}" for v, t in LOSES])
def test_typical_mistake_loses_the_points_of_its_test(scores, variant, test_id):
    assert scores[variant][test_id] == 0, f"{variant} should fail {test_id}: {scores[variant]}"


@pytest.mark.parametrize("variant", ["no_loss_scaling", "zero_grad_per_micro_batch", "one_backward_for_all"])
def test_an_accumulation_mistake_costs_nothing_in_the_all_reduce_exercise(scores, variant):
    s = scores[variant]
    assert s["test_average_gradients"] == 2 and s["test_average_gradients_like_ddp"] == 2, s


def test_the_exercise_mistakes_that_only_more_processes_reveal_pass_the_visible_checks(scores):
    # divide_by_two passes with 2 processes: only the hidden 3-process checks catch it.
    assert scores["divide_by_two"]["total"] == 4


# --- the smoke run and the dry run -------------------------------------------------------------------------------

def test_smoke_run_reaches_its_targets_and_records_what_it_measured():
    _, record = execute_chapter(SLUG)
    assert record["chapter"] == SLUG and record["profile"] == "smoke" and record["passed"] is True, record
    metrics = {m["metric"]: m for m in record["metrics"]}
    assert {"accumulation_weight_gap_no_norm", "ddp_sync_weight_gap", "ddp_metrics_gap", "allreduce_ms_per_step",
            "sweep_largest_batch_drop", "norm_batchnorm_smallest_drop"} <= set(metrics)
    assert record["settings"]["processes"] == 2
    assert record["extra"]["communication"]["steps"]["DDP, 25 MB buckets"] > 0


def test_full_dry_run_counts_the_torchrun_processes_in_its_estimate():
    _, record = execute_chapter(SLUG, "full", dry_run="bf16")
    assert record["settings"]["processes"] == 4
    names = [e["name"] for e in record["cost"]["entries"]]
    assert any("(each of 4 processes)" in n for n in names), names
    assert any(n.startswith("ResNet-9 recipe") for n in names)
