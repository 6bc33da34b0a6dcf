"""Chapter 6: one-cycle, warm-up, RAdam's rectification, sharpness and the recipe; graded right by real nbgrader."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from chapters import execute_chapter
from grading import edit_solution, grade_variants, solution_namespace

from fasttrain.recipes import (WeightAverage, cpu_budget_recipe, cpu_recipe, init_whitening, make_net, predict,
                               train_recipe)
from fasttrain.schedules import RADAM_THRESHOLD, LinearWarmup, OneCycle, one_cycle, radam_rectification, radam_rho
from fasttrain.sharpness import power_iteration, top_hessian_eigenvalue

SLUG = "06_one_cycle"

ONE_CYCLE_CASES = [
    dict(total_steps=100, max_lr=1.0),
    dict(total_steps=100, max_lr=0.4, pct_start=0.25, anneal_strategy="linear"),
    dict(total_steps=37, max_lr=2.0, pct_start=0.45, div_factor=10.0, final_div_factor=100.0),
    dict(total_steps=7, max_lr=1.0, pct_start=0.3),
    dict(total_steps=100, max_lr=1.0, three_phase=True),
    dict(total_steps=41, max_lr=3e-3, pct_start=0.35, three_phase=True, anneal_strategy="linear", div_factor=10.0),
    dict(total_steps=29, max_lr=1.0, pct_start=0.27, three_phase=True, base_momentum=0.8, max_momentum=0.9),
]


def _torch_trace(case: dict, optimizer: str) -> list[tuple[float, float]]:
    """(lr, momentum) that torch's OneCycleLR sets at steps 0..total_steps (the last step included)."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9) if optimizer == "sgd" else torch.optim.Adam([p], lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, **case)
    trace = []
    for t in range(case["total_steps"] + 1):
        g = opt.param_groups[0]
        trace.append((g["lr"], g["momentum"] if optimizer == "sgd" else g["betas"][0]))
        if t < case["total_steps"]:
            opt.step()
            sched.step()
    return trace


# ---------------------------------------------------------------------------------------------
# The library
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ONE_CYCLE_CASES)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_one_cycle_matches_onecyclelr_at_every_step(case, optimizer):
    kwargs = {k: v for k, v in case.items() if k != "total_steps"}
    for step, (lr, mom) in enumerate(_torch_trace(case, optimizer)):
        mine_lr, mine_mom = one_cycle(step, case["total_steps"], **kwargs)
        assert math.isclose(mine_lr, lr, rel_tol=1e-12, abs_tol=1e-15), (case, step)
        assert math.isclose(mine_mom, mom, rel_tol=1e-12), (case, step)


def test_onecycle_scheduler_drives_two_param_groups_like_onecyclelr():
    def make():
        a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
        return torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1, momentum=0.9, nesterov=True)

    theirs, mine = make(), make()
    ref = torch.optim.lr_scheduler.OneCycleLR(theirs, max_lr=[1.0, 0.25], total_steps=50, three_phase=True)
    ours = OneCycle(mine, [1.0, 0.25], 50, three_phase=True)
    for _ in range(50):
        for g1, g2 in zip(theirs.param_groups, mine.param_groups):
            assert math.isclose(g1["lr"], g2["lr"], rel_tol=1e-12) and math.isclose(g1["momentum"], g2["momentum"])
        theirs.step(), ref.step(), mine.step(), ours.step()


def test_one_cycle_rejects_steps_outside_the_cycle():
    with pytest.raises(ValueError, match="outside the cycle"):
        one_cycle(11, 10, 1.0)
    with pytest.raises(ValueError, match="pct_start"):
        one_cycle(0, 10, 1.0, pct_start=1.5)


@pytest.mark.parametrize("make_inner,unscaled", [
    (lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9), lambda base, t: base * 0.9 ** t),
    (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5), lambda base, t: base * 0.5 ** (t // 3)),
    (lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20),
     lambda base, t: base * (1 + math.cos(math.pi * t / 20)) / 2),
])
def test_linear_warmup_scales_any_scheduler_without_compounding(make_inner, unscaled):
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = LinearWarmup(make_inner(opt), warmup_steps=5)
    for t in range(20):
        want = unscaled(0.1, t) * min(1.0, (t + 1) / 5)
        assert math.isclose(opt.param_groups[0]["lr"], want, rel_tol=1e-9), t
        opt.step()
        sched.step()


def test_linear_warmup_rejects_a_zero_length_warmup():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="warmup_steps"):
        LinearWarmup(torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0), 0)


def test_radam_rectification_is_none_until_rho_exceeds_5_then_tends_to_1():
    assert [radam_rectification(t) for t in range(1, 6)] == [None] * 5
    assert math.isclose(radam_rectification(6), 0.0258211128, rel_tol=1e-6)
    values = [radam_rectification(t) for t in range(6, 5000)]
    assert all(a < b for a, b in zip(values, values[1:])) and values[-1] > 0.98


def test_onecycle_drives_the_optimizer_with_any_schedule_function():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    calls = []

    def schedule(step, total_steps, max_lr, **kwargs):
        calls.append((step, total_steps, max_lr, kwargs))
        return max_lr / (step + 1), 0.5 + step / 100

    sched = OneCycle(opt, 2.0, 10, schedule=schedule, pct_start=0.4)
    sched.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 / 3) and opt.param_groups[0]["momentum"] == pytest.approx(0.52)
    assert calls[0] == (0, 10, 2.0, {"pct_start": 0.4})


def test_radam_rho_and_the_threshold_follow_pytorch():
    rho_t, rho_inf = radam_rho(1, 0.999)
    assert rho_inf == pytest.approx(1999.0) and rho_t == pytest.approx(1.0)
    assert RADAM_THRESHOLD == 5.0  # torch.optim.RAdam's margin above Liu et al.'s bound of 4
    assert radam_rho(5, 0.999)[0] < 5 < radam_rho(6, 0.999)[0] and radam_rectification(6) is not None
    with pytest.raises(ValueError, match="from 1"):
        radam_rho(0)


def _small_double_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    return model, x, y


def test_power_iteration_reports_how_it_ended():
    model, x, y = _small_double_model()
    done = power_iteration(model, F.cross_entropy, x, y, max_iters=5000, tol=1e-8)
    assert done.converged and done.iterations < 5000 and done.residual <= 1e-8
    cut = power_iteration(model, F.cross_entropy, x, y, max_iters=2, tol=1e-8)
    assert not cut.converged and cut.iterations == 2 and cut.residual > 1e-8
    assert abs(cut.value) <= abs(done.value) * (1 + 1e-9), "an unfinished iteration cannot overshoot the top eigenvalue"
    other = power_iteration(model, F.cross_entropy, x, y, max_iters=5000, tol=1e-8, seed=7)
    assert other.value == pytest.approx(done.value, rel=1e-6), "a second start vector must find the same eigenvalue"
    with pytest.raises(ValueError, match="max_iters"):
        power_iteration(model, F.cross_entropy, x, y, max_iters=0)


def test_top_hessian_eigenvalue_matches_the_dense_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    lam = top_hessian_eigenvalue(model, F.cross_entropy, x, y, iters=5000, tol=1e-8)
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    flat = torch.cat([p.detach().flatten() for p in params])

    def loss_of(vector):
        chunks, i = [], 0
        for s in shapes:
            chunks.append(vector[i:i + s.numel()].view(s))
            i += s.numel()
        h = torch.tanh(x @ chunks[0].T + chunks[1])
        return F.cross_entropy(h @ chunks[2].T + chunks[3], y)

    eigenvalues = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat))
    top = eigenvalues[eigenvalues.abs().argmax()].item()
    assert math.isclose(lam, top, rel_tol=1e-6)


def test_whitening_layer_decorrelates_patches():
    torch.manual_seed(0)
    images = torch.randn(64, 3, 12, 12)
    images = images + 0.8 * images.roll(1, dims=-1)  # correlated neighbours
    conv = nn.Conv2d(3, 24, 2, bias=True)
    init_whitening(conv, images, eps=0.0)
    out = conv(images)[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = out.T @ out / len(out)
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=1e-3)


def test_weight_average_moves_weights_towards_the_average_and_copies_back():
    model = nn.Linear(3, 2)
    avg = WeightAverage(model)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    avg.update(model, decay=0.75)
    assert torch.allclose(model.weight, start + 0.25)
    assert torch.allclose(avg.average["weight"], start + 0.25)


def test_predict_with_mirror_tta_averages_the_two_views():
    torch.manual_seed(0)
    net = make_net((8, 8, 8)).eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        want = 0.5 * (net(x) + net(x.flip(-1)))
    assert torch.allclose(predict(net, x, tta=1), want, atol=1e-6)
    assert predict(net, x, tta=2).shape == (6, 10)
    with pytest.raises(ValueError, match="tta"):
        predict(net, x, tta=3)


def test_recipe_runs_end_to_end_and_reports_its_timing():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (300,), generator=gen)
    cfg = cpu_recipe(widths=(8, 8, 8), epochs=2.0, batch_size=64, ema_start_epoch=0.5, ema_every=1)
    result = train_recipe(cfg, (x[:256], y[:256], x[256:], y[256:]), "cpu", eval_every=1)
    assert 0.0 <= result.test_acc <= 1.0 and result.train_seconds > 0
    assert [r["epoch"] for r in result.history] == [1, 2] and "test_acc_plain" in result.history[0]
    with pytest.raises(ValueError, match="uint8 NCHW"):
        train_recipe(cfg, (x.float(), y, x, y), "cpu")



def _budgeted_run_on_a_fake_clock(monkeypatch, seconds_per_step):
    """A 20-s budgeted recipe run (8 steps an epoch, first guess 1 epoch) whose step n takes seconds_per_step(n)."""
    import fasttrain.recipes as recipes

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (576, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (576,), generator=gen)
    clock = {"t": 0.0}
    monkeypatch.setattr(recipes.time, "perf_counter", lambda: clock["t"])
    real_step = recipes.TrainStep.__call__

    def timed_step(self, *args, **kwargs):  # a deterministic pace of "training"
        clock["t"] += seconds_per_step(self.steps)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(recipes.TrainStep, "__call__", timed_step)
    cfg = cpu_recipe(widths=(8, 8, 8), epochs=1.0, batch_size=64, ema_start_epoch=0.5, ema_every=1, tta=0)
    return x, y, cfg, train_recipe(cfg, (x[:512], y[:512], x[512:], y[512:]), "cpu", budget_seconds=20.0)


def test_a_budgeted_recipe_run_replans_its_length_from_its_own_pace(monkeypatch):
    """A probe that misjudged the pace (here: a first guess of 1 epoch against a budget worth many) is corrected
    by the run itself: it times its steps after a warm-up and stretches the schedule to end with the budget."""
    x, y, cfg, result = _budgeted_run_on_a_fake_clock(monkeypatch, lambda steps_done: 1.0)  # every step 1 s
    # 8 steps an epoch at 1 s each: a 20 s budget (less its 2% margin, 19.6 s) is 19 steps, not the first guess's 8
    assert result.resizes and result.resizes[0]["was"] == 8
    assert result.resizes[0]["seconds_per_step"] == pytest.approx(1.0)
    assert result.epochs * 8 == 19 and result.train_seconds == pytest.approx(19.0)
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    # without a budget the same configuration trains its planned epoch
    assert train_recipe(cfg, (x[:512], y[:512], x[512:], y[512:]), "cpu").resizes == []
    with pytest.raises(ValueError, match="budget_seconds"):
        train_recipe(cfg, (x[:512], y[:512], x[512:], y[512:]), "cpu", budget_seconds=0)


def test_the_cpu_budget_recipe_widens_with_the_budget_and_trains_in_bf16_where_the_cpu_has_amx():
    import fasttrain.device as device_module

    short, long = cpu_budget_recipe(120), cpu_budget_recipe(600)
    assert short.cpu_bf16 and short.mixed_precision and long.cpu_bf16
    assert sum(short.widths) < sum(long.widths)
    with pytest.raises(ValueError, match="budget_seconds"):
        cpu_budget_recipe(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (300,), generator=gen)
    cfg = cpu_budget_recipe(120, widths=(8, 8, 8), epochs=1.0, batch_size=64, ema_start_epoch=0.5, ema_every=1)
    result = train_recipe(cfg, (x[:256], y[:256], x[256:], y[256:]), "cpu")
    assert 0.0 <= result.test_acc <= 1.0 and math.isfinite(result.history[-1]["train_loss"])
    with device_module.autocast("cpu", cpu=cfg.cpu_bf16):
        out = result.model(x[:2].float() / 255)
    assert out.dtype == (torch.bfloat16 if device_module.has_amx_bf16() else torch.float32)


def test_a_budgeted_run_replans_whenever_an_epochs_pace_changes_and_still_ends_with_its_budget(monkeypatch):
    """Steps that get faster after the first epoch (caches warm, the machine quietens) must not leave the end of
    the budget unused: the 600-s runs that re-planned only after their first epoch trained for 456 to 530 s."""
    # 1 s a step for 8 steps (one epoch), then 0.5 s
    _, _, _, result = _budgeted_run_on_a_fake_clock(monkeypatch, lambda steps_done: 1.0 if steps_done < 8 else 0.5)
    # the plan fills 19.6 s (the budget less its 2% margin). After epoch 1 (8 s spent, 1 s a step): 19 steps;
    # after epoch 2 (12 s spent, 0.5 s a step): 15 steps more
    assert [(r["at_step"], r["total_steps"]) for r in result.resizes] == [(8, 19), (16, 31)]
    assert result.train_seconds == pytest.approx(19.5) and result.epochs * 8 == 31
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# The notebook's exercises agree with the library
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def solutions():
    namespace = {"math": math, "torch": torch, "nn": nn}
    solution_namespace(SLUG, ("one_cycle", "linear_warmup", "radam_rect"), namespace)
    return namespace


def test_exercise_one_cycle_agrees_with_the_library(solutions):
    for case in ONE_CYCLE_CASES:
        kwargs = {k: v for k, v in case.items() if k != "total_steps"}
        for step in range(case["total_steps"] + 1):
            assert solutions["one_cycle_lr"](step, case["total_steps"], **kwargs) == pytest.approx(
                one_cycle(step, case["total_steps"], **kwargs), rel=1e-12)


def test_exercise_warmup_agrees_with_the_library(solutions):
    traces = []
    for cls in (solutions["LinearWarmup"], LinearWarmup):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = cls(torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8), 4)
        trace = []
        for _ in range(10):
            trace.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        traces.append(trace)
    assert traces[0] == pytest.approx(traces[1], rel=1e-12)


def test_exercise_rectification_agrees_with_the_library(solutions):
    for beta2 in (0.99, 0.999):
        for t in range(1, 300):
            mine, lib = solutions["radam_rectification"](t, beta2), radam_rectification(t, beta2)
            assert (mine is None and lib is None) or mine == pytest.approx(lib, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Grading with real nbgrader
# ---------------------------------------------------------------------------------------------

BOTH = {"test_one_cycle_two_phase", "test_one_cycle_three_phase"}
THREE = {"test_one_cycle_three_phase"}
WARMUP = {"test_linear_warmup"}
RADAM = {"test_radam_rect"}
EXERCISE_TESTS = ("test_one_cycle_two_phase", "test_one_cycle_three_phase", "test_linear_warmup", "test_radam_rect")


def _edit(grade_id: str, old: str, new: str) -> tuple[str, str]:
    """A wrong answer to solution cell `grade_id`: its source with `old` replaced by `new`."""
    return grade_id, edit_solution(SLUG, grade_id, old, new)


# Typical mistakes: name -> ((grade id, wrong source), the tests it must fail). The last of each group are new.
MISTAKES = {
    # one_cycle_lr
    "cos_linear_mixup": (_edit("one_cycle", 'if anneal_strategy == "cos":', 'if anneal_strategy == "linear":'), BOTH),
    "no_momentum_cycling": (_edit("one_cycle", "return interpolate(lr_a, lr_b, f), interpolate(mom_a, mom_b, f)",
                                  "return interpolate(lr_a, lr_b, f), max_momentum"), BOTH),
    "phase_end_off_by_one": (_edit("one_cycle", "(pct_start * total_steps - 1,", "(pct_start * total_steps,"), BOTH),
    "three_phase_end_off_by_one": (_edit("one_cycle", "2 * pct_start * total_steps - 2",
                                         "2 * pct_start * total_steps - 1"), THREE),
    # the final rate taken from the peak: max_lr / final_div_factor instead of initial_lr / final_div_factor
    "min_lr_from_max": (_edit("one_cycle", "min_lr = initial_lr / final_div_factor",
                              "min_lr = max_lr / final_div_factor"), BOTH),
    # momentum moves the same way as the rate (up to max_momentum at the peak)
    "momentum_reversed": (_edit("one_cycle", "interpolate(mom_a, mom_b, f)", "interpolate(mom_b, mom_a, f)"), BOTH),
    # phase ends rounded to whole steps: right whenever pct_start * total_steps is a whole number
    "rounded_phase_ends": (_edit("one_cycle", "(pct_start * total_steps - 1,", "(int(pct_start * total_steps) - 1,"),
                           BOTH),
    # torch's OneCycleLR stepped `step` times instead of the formula
    "one_cycle_delegates_to_torch": (("one_cycle", """def one_cycle_lr(step, total_steps, max_lr, **kwargs):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=max_lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr, total_steps=total_steps, **kwargs)
    for _ in range(step):
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]
"""), BOTH),
    # LinearWarmup
    "warmup_compounds": (_edit("linear_warmup",
                               'for group, lr in zip(self.optimizer.param_groups, self.unscaled):\n            group["lr"] = lr\n        self.scheduler.step()',
                               "self.scheduler.step()"), WARMUP),
    "warmup_starts_at_zero": (_edit("linear_warmup", "(self.t + 1) / self.warmup_steps", "self.t / self.warmup_steps"),
                              WARMUP),
    # the scheduler's base rates instead of the rates it has set: wrong for schedulers that start below their base
    "warmup_base_lrs": (_edit("linear_warmup",
                              'self.unscaled = [group["lr"] for group in self.optimizer.param_groups]\n        self._scale()',
                              "self.unscaled = list(scheduler.base_lrs)\n        self._scale()"), WARMUP),
    # the first update is taken at the full rate: the factor of step 0 is never applied
    "warmup_not_scaled_at_start": (_edit("linear_warmup",
                                         'self.unscaled = [group["lr"] for group in self.optimizer.param_groups]\n        self._scale()\n',
                                         'self.unscaled = [group["lr"] for group in self.optimizer.param_groups]\n'),
                                   WARMUP),
    # the library's wrapper, subclassed
    "warmup_subclasses_library": (("linear_warmup", """from fasttrain.schedules import LinearWarmup as _LibraryWarmup


class LinearWarmup(_LibraryWarmup):
    pass
"""), WARMUP),
    # radam_rectification
    "rectification_without_threshold": (_edit("radam_rect", "    if rho_t <= 5:\n        return None\n", ""), RADAM),
    # Liu et al.'s bound of 4 as the threshold, where torch.optim.RAdam uses 5
    "radam_threshold_4": (_edit("radam_rect", "if rho_t <= 5:", "if rho_t <= 4:"), RADAM),
    # rho_inf = 2 / (1 - beta2), without the - 1
    "rho_inf_off_by_one": (_edit("radam_rect", "rho_inf = 2 / (1 - beta2) - 1", "rho_inf = 2 / (1 - beta2)"), RADAM),
    # the library's rectification, imported under the exercise's name
    "radam_from_the_library": (("radam_rect", "from fasttrain.schedules import radam_rectification\n"), RADAM),
}

# Mistakes in different exercises share a submission (each test grades one exercise), so the real nbgrader
# grades 8 wrong submissions for the 17 mistakes, plus the solution and the blank copy.
SUBMISSIONS = [
    ("cos_linear_mixup", "warmup_compounds", "rectification_without_threshold"),
    ("no_momentum_cycling", "warmup_starts_at_zero", "radam_threshold_4"),
    ("phase_end_off_by_one", "warmup_base_lrs", "rho_inf_off_by_one"),
    ("three_phase_end_off_by_one", "warmup_not_scaled_at_start", "radam_from_the_library"),
    ("min_lr_from_max", "warmup_subclasses_library"),
    ("momentum_reversed",),
    ("rounded_phase_ends",),
    ("one_cycle_delegates_to_torch",),
]
STUDENT = {mistake: "__".join(group) for group in SUBMISSIONS for mistake in group}


def test_every_mistake_is_graded_once_and_no_submission_has_two_answers_to_one_exercise():
    assert sorted(STUDENT) == sorted(MISTAKES)
    for group in SUBMISSIONS:
        cells = [MISTAKES[m][0][0] for m in group]
        assert len(cells) == len(set(cells)), group


@pytest.fixture(scope="module")
def scores():
    variants = {"__".join(group): dict(MISTAKES[m][0] for m in group) for group in SUBMISSIONS}
    return grade_variants(SLUG, variants, timeout=60)


def test_solution_gets_full_marks(scores):
    assert scores["solution"]["total"] == scores["solution"]["max"] == 8


def test_blank_student_copy_scores_zero(scores):
    assert scores["blank"]["total"] == 0


def test_autograding_reports_no_changed_cells_and_no_tampering(scores):
    assert "has changed" not in scores.log and "Tampering" not in scores.log, scores.log[-3000:]


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_typical_mistake_loses_the_points_of_its_test(scores, mistake):
    student = STUDENT[mistake]
    s = scores[student]
    failing = MISTAKES[mistake][1]
    assert all(s[t] == 0 for t in failing), f"{mistake} should fail {sorted(failing)}: {s}"
    wrong = set().union(*(MISTAKES[m][1] for m in student.split("__")))
    assert all(s[t] > 0 for t in EXERCISE_TESTS if t not in wrong), f"{student} should lose only {sorted(wrong)}: {s}"


def test_smoke_run_reaches_its_targets_and_records_them():
    _, record = execute_chapter(SLUG)
    assert record["chapter"] == SLUG and record["profile"] == "smoke"
    assert record["passed"] is True, record
    metrics = {m["metric"]: m for m in record["metrics"]}
    assert set(metrics) == {"recipe_test_acc", "adam_cold_spike_fraction", "adam_warmup_spike_fraction",
                            "sharpness_converged_fraction", "onecycle_gain_over_constant"}
    runs = record["extra"]["adam_runs"]
    assert len(runs) == 4 and all(len(seeds) == 5 for seeds in runs.values()), "4 settings, 5 seeds each"
    sweep = record["extra"]["schedule_sweep"]
    assert {r["schedule"] for r in sweep} == {"constant", "step", "cosine", "one cycle"}
    assert len(sweep) == 4 * len(record["settings"]["sched_factors"]) * record["settings"]["sched_seeds"]
    curves = record["extra"]["sharpness"]
    assert all(all(c["converged"]) for c in curves.values()), "every sharpness estimate converged"
    for key in ("device", "wall_seconds", "torch_version", "fasttrain_version", "date"):
        assert record[key]
