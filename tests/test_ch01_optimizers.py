"""Chapter 1: the optimizers exercise is graded right by real nbgrader, and the smoke run reaches its targets."""

import pytest
import torch

from chapters import execute_chapter
from fasttrain_course.chapters import ChapterRunFailed, run_chapter
from grading import edit_solution, grade_variants, solution_source

SLUG = "01_optimizers"


def _edit(grade_id: str, old: str, new: str) -> dict[str, str]:
    """A wrong variant of solution cell `grade_id`: `old` replaced by `new`."""
    return {grade_id: edit_solution(SLUG, grade_id, old, new)}


WRONG = {
    # Adam without bias correction: m and v are used as they are.
    "adam_no_bias_correction": _edit("adam", "m_hat = m / (1 - beta1 ** t)\n                v_hat = v / (1 - beta2 ** t)",
                                     "m_hat = m\n                v_hat = v"),
    # AdamW whose decay is added to the gradient (coupled, i.e. Adam's L2) instead of applied to the weights.
    "adamw_coupled_decay": _edit("adamw", "g = p.grad\n                p.mul_(1 - group[\"lr\"] * group[\"weight_decay\"])",
                                 "g = p.grad + group[\"weight_decay\"] * p"),
    # Momentum whose step uses the raw gradient instead of the velocity.
    "momentum_raw_gradient": _edit("sgd_momentum", "p.add_(state[\"momentum_buffer\"], alpha=-group[\"lr\"])",
                                   "p.add_(g, alpha=-group[\"lr\"])"),
    # Adam with one step count for the whole optimizer instead of one per parameter.
    "adam_shared_step_count": _edit("adam", "state[\"step\"] += 1\n                t = state[\"step\"]",
                                    "state[\"step\"] += 1\n                self._t = getattr(self, \"_t\", 0) + 1\n                t = self._t"),
    # The mistakes below pass a comparison with torch on fresh gradients and small eps; each submission makes two,
    # in different exercises, and must lose the points of exactly those two tests.
    # Momentum's buffer is the gradient tensor itself (no clone): zeroing gradients in place wipes the velocity.
    # Adam's eps inside the square root: invisible while eps is far below sqrt(v).
    "momentum_aliases_grad_and_adam_eps_in_root": {
        **_edit("sgd_momentum", 'state["momentum_buffer"] = g.clone()', 'state["momentum_buffer"] = g'),
        **_edit("adam", 'p.addcdiv_(m_hat, v_hat.sqrt().add_(group["eps"]), value=-group["lr"])',
                'p.addcdiv_(m_hat, (v_hat + group["eps"]).sqrt(), value=-group["lr"])')},
    # RMSprop's eps inside the root; AdamW's decay applied after the update (on the new weights).
    "rmsprop_eps_in_root_and_adamw_decay_after_update": {
        **_edit("rmsprop", 'p.addcdiv_(g, v.sqrt().add_(group["eps"]), value=-group["lr"])',
                'p.addcdiv_(g, (v + group["eps"]).sqrt(), value=-group["lr"])'),
        "adamw": edit_solution(SLUG, "adamw", '\n                p.mul_(1 - group["lr"] * group["weight_decay"])', "").replace(
            'value=-group["lr"])', 'value=-group["lr"])\n                p.mul_(1 - group["lr"] * group["weight_decay"])')},
    # RMSprop adds the weight decay into p.grad in place; Adam decays the weights directly (AdamW's rule in Adam).
    "rmsprop_decay_into_grad_and_adam_decoupled": {
        **_edit("rmsprop", 'g = g + group["weight_decay"] * p', 'g = g.add_(p, alpha=group["weight_decay"])'),
        **_edit("adam", 'if group["weight_decay"] != 0:\n                    g = g + group["weight_decay"] * p',
                'if group["weight_decay"] != 0:\n                    p.mul_(1 - group["lr"] * group["weight_decay"])')},
    # Momentum without the `p.grad is None` skip; AdamW that hands the work to torch.optim.AdamW.
    "momentum_no_none_check_and_adamw_delegates": {
        **_edit("sgd_momentum", "if p.grad is None:\n                    continue\n                ", ""),
        "adamw": ("class AdamW(torch.optim.Optimizer):\n"
                  "    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):\n"
                  "        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))\n"
                  "        self.inner = torch.optim.AdamW(self.param_groups)\n\n"
                  "    def step(self, closure=None):\n"
                  "        return self.inner.step(closure)\n")},
    # A student's infinite loop: the cell is interrupted at the timeout, scores 0, grading goes on.
    "rmsprop_infinite_loop": {"rmsprop": solution_source(SLUG, "rmsprop").replace(
        "for group in self.param_groups:", "while True:\n            pass\n        for group in self.param_groups:", 1)},
}


@pytest.fixture(scope="module")
def scores():
    return grade_variants(SLUG, WRONG, timeout=20, feedback=True)


def test_solution_gets_full_marks(scores):
    assert scores["solution"]["total"] == scores["solution"]["max"] == 10


def test_blank_student_copy_scores_zero(scores):
    assert scores["blank"]["total"] == 0


@pytest.mark.parametrize("variant,test_id", [
    ("adam_no_bias_correction", "test_adam"),
    ("adamw_coupled_decay", "test_adamw"),
    ("momentum_raw_gradient", "test_sgd_momentum"),
    ("adam_shared_step_count", "test_adam"),
])
def test_typical_mistake_loses_the_points_of_its_test(scores, variant, test_id):
    s = scores[variant]
    assert s[test_id] == 0, f"{variant} should fail {test_id}: {s}"
    others = [k for k in ("test_sgd_momentum", "test_rmsprop", "test_adam", "test_adamw") if k != test_id]
    assert all(s[k] > 0 for k in others), f"{variant} should lose only {test_id}'s points: {s}"


@pytest.mark.parametrize("variant,lost", [
    ("momentum_aliases_grad_and_adam_eps_in_root", {"test_sgd_momentum", "test_adam"}),
    ("rmsprop_eps_in_root_and_adamw_decay_after_update", {"test_rmsprop", "test_adamw"}),
    ("rmsprop_decay_into_grad_and_adam_decoupled", {"test_rmsprop", "test_adam"}),
    ("momentum_no_none_check_and_adamw_delegates", {"test_sgd_momentum", "test_adamw"}),
])
def test_mistakes_the_torch_comparison_misses_lose_exactly_their_tests(scores, variant, lost):
    s = scores[variant]
    tests = ("test_sgd_momentum", "test_rmsprop", "test_adam", "test_adamw")
    assert {k for k in tests if s[k] == 0} == lost, f"{variant} should lose exactly {sorted(lost)}: {s}"


def test_feedback_is_generated_for_every_submission(scores):
    for name, s in scores.items():
        assert s["feedback"] and "test_adam" in s["feedback"], f"no feedback for {name}"


def test_infinite_loop_scores_zero_on_its_cell_and_grading_goes_on(scores):
    s = scores["rmsprop_infinite_loop"]
    # the loop sits in the solution cell: its test cell then fails (RMSprop undefined)
    assert s["test_rmsprop"] == 0
    assert s["test_adam"] > 0 and s["test_adamw"] > 0


def test_smoke_run_reaches_its_targets_and_records_them():
    _, record = execute_chapter(SLUG)
    assert record["chapter"] == SLUG and record["profile"] == "smoke"
    assert record["passed"] is True, record
    metrics = {m["metric"]: m for m in record["metrics"]}
    assert set(metrics) == {"adam_epochs_to_fit_100", "digits_test_accuracy"}
    assert all(m["passed"] for m in metrics.values())
    for key in ("device", "wall_seconds", "torch_version", "fasttrain_version", "date"):
        assert record[key]


def test_a_missed_target_fails_the_papermill_run_with_a_message_naming_it(repo_root, tmp_path):
    with pytest.raises(ChapterRunFailed) as err:
        run_chapter(SLUG, "smoke", out_dir=tmp_path, results_dir=tmp_path, parameters={"adam_lr": 1e-7},
                    root=repo_root)
    message = str(err.value)
    assert "Target missed" in message and "adam_epochs_to_fit_100" in message and "<= 30" in message


def test_an_unknown_profile_fails_the_run_with_a_clear_error(repo_root, tmp_path):
    with pytest.raises(ChapterRunFailed, match="Unknown profile 'quick'"):
        run_chapter(SLUG, "quick", out_dir=tmp_path, results_dir=tmp_path, root=repo_root)


def test_autograding_reports_no_false_tampering_warnings(scores):
    assert "has changed" not in scores.log and "Tampering" not in scores.log, scores.log[-2000:]
