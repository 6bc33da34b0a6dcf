"""Chapter 5, the learning-rate range test: the library's finder, its cross-check with torch-lr-finder,
the exercise's agreement with the library, the graded tests (through real nbgrader) and the smoke run."""

from __future__ import annotations

import contextlib
import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

import fasttrain
from fasttrain import runtime
from fasttrain.batches import DeviceLoader
from fasttrain.checks import tripwires
from fasttrain.lr_finder import (TWINS, RangeTest, exponential_lrs, lr_sweep, plot_range_test, range_test,
                                 record_range_test, smooth_losses, suggest_minimum, suggest_steepest, suggest_valley)

SLUG = "05_lr_finder"


# --- helpers ---------------------------------------------------------------------------------
class ScriptedLoss:
    """A loss function that returns a fixed sequence of values (one per call), whatever the model predicts."""

    def __init__(self, values):
        self.values, self.calls = list(values), 0

    def __call__(self, preds, target):
        value = self.values[self.calls]
        self.calls += 1
        return preds.sum() * 0.0 + value


class RecordingSGD(torch.optim.SGD):
    """SGD that remembers the learning rate of every step it takes."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.used = []

    def step(self, closure=None):
        self.used.append(self.param_groups[0]["lr"])
        return super().step(closure)


def one_batch():
    return [(torch.ones(4, 1), torch.zeros(4, dtype=torch.long))]


def digits_batches(seed: int = 0, batch_size: int = 64):
    """The 8x8 digits in shuffled batches (a list, so it can be iterated again)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return [(x[order[i:i + batch_size]], y[order[i:i + batch_size]])
            for i in range(0, len(x) - batch_size + 1, batch_size)]


def small_net(seed: int = 0, batch_norm: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(64, 64)] + ([nn.BatchNorm1d(64)] if batch_norm else []) + [nn.ReLU(), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


def known_curve():
    """41 rates over 1e-4..1, a flat start, a strict descent to a minimum at index 30, then a rise.

    Known answers: minimum at index 30; steepest (central differences) at index 21, where the
    drops of 0.4 (20 -> 21) and 0.2 (21 -> 22) meet; valley: the longest strictly decreasing run
    is indices 10..30 (21 points), so start = 30 - 21 = 9, span = 21 and 9 + 7 + 3 = 19.
    """
    lrs = np.geomspace(1e-4, 1.0, 41)
    drops = np.full(20, 0.05)
    drops[[9, 10, 11]] = [0.1, 0.4, 0.2]  # the drops 19->20, 20->21, 21->22
    losses = np.concatenate([np.full(11, 2.5), 2.5 - np.cumsum(drops), np.linspace(1.2, 3.0, 10)])
    assert losses.shape == (41,) and int(np.argmin(losses)) == 30
    return lrs, losses


def fastai_valley_reference(lrs, losses) -> float:
    """fastai's valley rule written out with its two loops, to pin the vectorised library version."""
    n = len(losses)
    lds = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end, max_start = i, i - lds[i]
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    return float(lrs[max(idx, 0)])  # fastai would wrap -1 around to the last rate on a curve that never falls


def snapshot(model, optimizer):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            copy.deepcopy(optimizer.state_dict()))  # state_dict() holds live references: copy them


def assert_same_tensors(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tensors(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tensors(x, y)
    else:
        assert a == b


# --- the schedule and the smoothing ------------------------------------------------------------
def test_exponential_lrs_multiply_by_the_same_factor_from_start_to_end():
    lrs = exponential_lrs(1e-6, 10.0, 8)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(10.0)
    np.testing.assert_allclose(lrs[1:] / lrs[:-1], (1e7) ** (1 / 7))


def test_exponential_lrs_reject_a_downward_or_empty_range_with_a_clear_message():
    with pytest.raises(ValueError, match="start_lr < end_lr"):
        exponential_lrs(1.0, 1e-3, 10)
    with pytest.raises(ValueError, match="num_steps"):
        exponential_lrs(1e-6, 1.0, 1)


def test_smoothed_loss_of_a_constant_curve_is_that_constant_thanks_to_bias_correction():
    np.testing.assert_allclose(smooth_losses([2.0] * 50, beta=0.98), 2.0)


def test_smoothed_loss_is_the_bias_corrected_exponential_average():
    losses = [3.0, 1.0, 2.0, 5.0]
    beta = 0.9
    avg, expected = 0.0, []
    for i, x in enumerate(losses):
        avg = beta * avg + (1 - beta) * x
        expected.append(avg / (1 - beta ** (i + 1)))
    np.testing.assert_allclose(smooth_losses(losses, beta), expected)
    assert smooth_losses(losses, beta)[0] == 3.0


# --- the range test ----------------------------------------------------------------------------
def test_range_test_trains_each_step_at_its_rate_of_the_exponential_schedule():
    model = nn.Linear(1, 2)
    optimizer = RecordingSGD(model.parameters(), lr=0.5)
    result = range_test(model, optimizer, one_batch(), loss_fn=ScriptedLoss([1.0] * 20),
                        start_lr=1e-4, end_lr=1.0, num_steps=20)
    np.testing.assert_allclose(optimizer.used, np.geomspace(1e-4, 1.0, 20))
    np.testing.assert_allclose(result.lrs, np.geomspace(1e-4, 1.0, 20))
    assert optimizer.param_groups[0]["lr"] == 0.5, "the optimizer's own rate must come back after the test"


def test_range_test_stops_at_the_first_step_past_4_times_the_minimum_and_keeps_it():
    values = [1.0] * 30 + [1.0 + k for k in range(1, 60)]
    result = range_test(nn.Linear(1, 2), torch.optim.SGD(nn.Linear(1, 2).parameters(), lr=0.1), one_batch(),
                        loss_fn=ScriptedLoss(values), num_steps=len(values))
    expected = smooth_losses(values)
    stop = next(i for i in range(len(values)) if expected[i] > 4 * expected[:i + 1].min())
    assert stop == 43
    assert result.diverged and result.steps == stop + 1
    np.testing.assert_allclose(result.smoothed, expected[:stop + 1])
    np.testing.assert_allclose(result.losses, values[:stop + 1])


def test_range_test_without_divergence_runs_every_step_and_does_not_stop_on_a_constant_loss():
    model = nn.Linear(1, 2)
    result = range_test(model, torch.optim.SGD(model.parameters(), lr=0.1), one_batch(),
                        loss_fn=ScriptedLoss([2.0] * 50), num_steps=50)
    # Without bias correction the average starts near 0 and "passes 4x its minimum" by step 4.
    assert result.steps == 50 and not result.diverged
    np.testing.assert_allclose(result.smoothed, 2.0)


def test_range_test_stops_when_the_loss_is_not_finite():
    model = nn.Linear(1, 2)
    result = range_test(model, torch.optim.SGD(model.parameters(), lr=0.1), one_batch(),
                        loss_fn=ScriptedLoss([1.0] * 10 + [math.inf] + [1.0] * 9), num_steps=20)
    assert result.diverged and result.steps == 11


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.Adam(p, lr=3e-4, weight_decay=1e-4),
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
], ids=["adam", "sgd-nesterov"])
def test_range_test_restores_weights_buffers_grads_and_optimizer_state_bit_for_bit(make_optimizer):
    model = small_net(batch_norm=True)
    optimizer = make_optimizer(model.parameters())
    batches = digits_batches()
    for xb, yb in batches[:3]:  # a model mid-training: optimizer state and BN statistics exist
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    model.eval()
    before = snapshot(model, optimizer)
    result = range_test(model, optimizer, batches, start_lr=1e-5, end_lr=10, num_steps=60)
    assert result.steps > 10, "the test must actually have trained for this check to mean anything"
    assert not model.training, "the train/eval mode must come back too"
    assert_same_tensors(snapshot(model, optimizer), before)
    # ...and the restored optimizer still drives the model's own parameters.
    xb, yb = batches[0]
    w = model[0].weight.detach().clone()
    nn.functional.cross_entropy(model(xb), yb).backward()
    optimizer.step()
    assert not torch.equal(model[0].weight, w)


def test_range_test_restores_the_model_even_when_training_raises():
    model = small_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = snapshot(model, optimizer)

    def failing_loss(preds, target, calls=[]):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("boom")
        return nn.functional.cross_entropy(preds, target)

    with pytest.raises(RuntimeError, match="boom"):
        range_test(model, optimizer, digits_batches(), loss_fn=failing_loss, start_lr=0.1, end_lr=10, num_steps=20)
    assert_same_tensors(snapshot(model, optimizer), before)


def test_range_test_reiterates_data_shorter_than_the_test_and_rejects_empty_data():
    model = small_net()
    result = range_test(model, torch.optim.SGD(model.parameters(), lr=0.1), digits_batches()[:3],
                        start_lr=1e-5, end_lr=1e-3, num_steps=10)
    assert result.steps == 10
    with pytest.raises(ValueError, match="no batches"):
        range_test(model, torch.optim.SGD(model.parameters(), lr=0.1), [], num_steps=10)


# --- the suggestion rules ----------------------------------------------------------------------
def test_minimum_rule_is_the_rate_at_the_lowest_loss_divided_by_10():
    lrs, losses = known_curve()
    assert suggest_minimum(lrs, losses) == pytest.approx(lrs[30] / 10)


def test_steepest_rule_is_the_most_negative_slope_against_log_rate():
    lrs, losses = known_curve()
    assert suggest_steepest(lrs, losses) == pytest.approx(lrs[21])


def test_valley_rule_lies_about_halfway_along_the_longest_descent():
    lrs, losses = known_curve()
    assert suggest_valley(lrs, losses) == pytest.approx(lrs[19])


def test_valley_rule_matches_fastais_two_loop_definition_on_random_curves():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(3, 60))
        lrs = np.geomspace(1e-6, 1.0, n)
        losses = np.round(rng.normal(size=n).cumsum(), 1)  # rounding makes ties, which must not count
        assert suggest_valley(lrs, losses) == fastai_valley_reference(lrs, losses), losses


def test_suggestions_skip_a_tenth_of_the_planned_steps_and_the_last_5_points():
    lrs, losses = known_curve()
    padded_lrs = np.geomspace(1e-5, 10.0, 61)
    padded = np.concatenate([np.full(10, 9.0), losses, np.full(10, 0.01)])  # junk the trim must remove
    result = RangeTest(padded_lrs, padded, padded, True, 0.0, {"num_steps": 100})
    assert result.default_skips() == (10, 5)
    kept = result.suggest(skip_end=10)
    assert kept["minimum/10"] == pytest.approx(padded_lrs[10 + 30] / 10)
    assert kept["valley"] == pytest.approx(padded_lrs[10 + 19])


def test_plot_marks_every_suggestion_on_a_log_axis():
    import matplotlib

    matplotlib.use("Agg")
    lrs, losses = known_curve()
    result = RangeTest(lrs, losses, losses, False, 0.0, {"num_steps": 41})
    suggestions = result.suggest(skip_start=0, skip_end=0)
    ax = plot_range_test(result, suggestions)
    labels = [line.get_label() for line in ax.get_lines()]
    assert ax.get_xscale() == "log"
    for name in ("minimum/10", "steepest", "valley"):
        assert any(label.startswith(name) for label in labels), labels
    low, high = ax.get_ylim()
    assert low < losses.min() and high >= losses[0], "the descent from the first loss to the minimum must be in view"
    rising = RangeTest(lrs[:5], np.arange(1.0, 6.0), np.arange(1.0, 6.0), True, 0.0, {"num_steps": 5})
    low, high = plot_range_test(rising).get_ylim()
    assert high - low > 0.01, "a curve that never falls still needs a readable axis"


# --- cross-check with the torch-lr-finder package ----------------------------------------------
CROSS_CHECK_FACTOR = 2.0


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_finder_suggests_within_a_factor_of_2_of_torch_lr_finder_on_the_same_model_data_and_seed(optimizer_name):
    """Same initial weights, batches, schedule (1e-6..10, 100 steps) and stop (4x): steepest and minimum/10 agree.

    The packages differ only in how the average starts (torch-lr-finder starts it at the first loss,
    without bias correction), so the curves agree once the average has warmed up; the valley rule,
    which reads the whole early curve, is not compared.
    """
    import matplotlib
    from torch_lr_finder import LRFinder

    matplotlib.use("Agg")
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    dataset = torch.utils.data.TensorDataset(torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y))

    def loader():
        return torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True, drop_last=True,
                                           generator=torch.Generator().manual_seed(0))

    def setup():
        model = small_net(seed=0, batch_norm=False)
        opt = (torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9) if optimizer_name == "sgd"
               else torch.optim.Adam(model.parameters(), lr=1e-6))
        return model, opt

    ours = range_test(*setup(), loader(), start_lr=1e-6, end_lr=10, num_steps=100).suggest()
    model, opt = setup()
    finder = LRFinder(model, opt, nn.CrossEntropyLoss())
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        finder.range_test(loader(), start_lr=1e-6, end_lr=10, num_iter=100, smooth_f=0.02, diverge_th=4)
        _, their_steepest = finder.plot(skip_start=10, skip_end=5, suggest_lr=True)
    lrs, losses = np.array(finder.history["lr"][10:-5]), np.array(finder.history["loss"][10:-5])
    theirs = {"steepest": their_steepest, "minimum/10": suggest_minimum(lrs, losses)}
    for rule, lr in theirs.items():
        ratio = max(ours[rule] / lr, lr / ours[rule])
        assert ratio <= CROSS_CHECK_FACTOR, f"{rule}: fasttrain {ours[rule]:.3g} vs torch-lr-finder {lr:.3g}"


# --- the brute-force sweep ----------------------------------------------------------------------
def test_lr_sweep_trains_every_rate_from_the_same_initial_weights():
    batches = digits_batches()
    train, valid = batches[:20], batches[20:]
    rows = lr_sweep(lambda: small_net(batch_norm=False), lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
                    train, valid, [0.05, 0.05, 1e-9], epochs=1, seed=3)
    assert [r["lr"] for r in rows] == [0.05, 0.05, 1e-9]
    assert rows[0]["valid_loss"] == rows[1]["valid_loss"], "the same rate from the same seed must give the same run"
    assert rows[0]["valid_acc"] > rows[2]["valid_acc"], "a sensible rate must beat a rate of 1e-9 after one epoch"
    assert all(r["seconds"] > 0 for r in rows)


def test_lr_sweep_gives_every_rate_the_same_batches_from_a_seeded_loader():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)
    train = DeviceLoader(x[:1200], y[:1200], 64, seed=5)  # its shuffle advances with every pass
    valid = DeviceLoader(x[1200:], y[1200:], 256, shuffle=False)
    rows = lr_sweep(lambda: small_net(batch_norm=False), lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
                    train, valid, [0.05, 0.05], epochs=2, seed=1)
    assert rows[0]["valid_loss"] == rows[1]["valid_loss"], "the second rate saw other batches than the first"
    assert [h["epoch"] for h in rows[0]["history"]] == [1, 2] and "train_loss" in rows[0]["history"][0]


def test_each_runs_every_item_and_in_a_dry_run_two_whose_planned_cost_counts_for_all(tmp_path, monkeypatch):
    assert list(runtime.each([1, 2, 3])) == [1, 2, 3]
    monkeypatch.setattr(runtime, "_current", runtime._current)  # the dry run ends with this test
    run = fasttrain.start(SLUG, profile="full", device="cpu", dry_run=True, results_dir=tmp_path)
    try:
        seen = []
        for seed in runtime.each([0, 1, 2]):
            for lr in runtime.each([0.1, 0.2, 0.3, 0.4]):
                seen.append((seed, lr))
                runtime.meter("train", "inner").plan(10, 100)
        assert seen == [(0, 0.1), (0, 0.2), (1, 0.1), (1, 0.2)]
        planned = [(m.planned_steps, m.planned_samples) for m in run.meters]
        assert planned == [(30, 300)] * 4, "4 of 12 trainings ran: each counts for 3"
    finally:
        run.metric("suggested_lr_test_accuracy", 0.0)  # a dry run's numbers are never judged
        run.finish()  # a dry-run record in tmp_path; the forced autocast is undone


# --- the exercise against the library ------------------------------------------------------------
def exercise_namespace() -> dict:
    """The chapter's solution cells (range test and the three rules) run in a namespace of their own."""
    import itertools

    import torch.nn.functional as F
    from grading import solution_namespace

    ns = {"copy": copy, "itertools": itertools, "math": math, "np": np, "torch": torch, "nn": nn, "F": F}
    solution_namespace(SLUG, ("range_test", "suggest_minimum", "suggest_steepest", "suggest_valley"), ns)
    return ns


def test_exercise_range_test_and_rules_agree_with_the_library_on_the_same_model_data_and_seed():
    ns = exercise_namespace()
    batches = digits_batches()

    def setup():
        model = small_net(seed=0, batch_norm=False)  # without BN this net's loss blows up before 10: the stop is compared too
        return model, torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)

    model, opt = setup()
    before = snapshot(model, opt)
    lrs, smoothed = ns["range_test"](model, opt, batches, start_lr=1e-6, end_lr=10.0, num_steps=100)
    after = snapshot(model, opt)
    assert_same_tensors((after[0], after[2]), (before[0], before[2]))  # the exercise restores weights and optimizer
    ours = range_test(*setup(), batches, start_lr=1e-6, end_lr=10.0, num_steps=100)
    assert ours.diverged and len(lrs) == ours.steps
    np.testing.assert_allclose(lrs, ours.lrs, rtol=1e-12)
    np.testing.assert_allclose(smoothed, ours.smoothed, rtol=1e-5)
    skip_start, skip_end = ours.default_skips()
    kept_lrs, kept = np.asarray(lrs)[skip_start:len(lrs) - skip_end], np.asarray(smoothed)[skip_start:len(lrs) - skip_end]
    library = ours.suggest()
    for rule, name in (("minimum/10", "suggest_minimum"), ("steepest", "suggest_steepest"), ("valley", "suggest_valley")):
        assert ns[name](kept_lrs, kept) == pytest.approx(library[rule], rel=1e-9), rule


def test_record_range_test_runs_the_exercise_keeps_its_raw_losses_and_names_a_missing_exercise():
    ns = exercise_namespace()
    batches = digits_batches()

    def setup():
        model = small_net(seed=0, batch_norm=False)
        return model, torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)

    theirs = record_range_test(ns["range_test"], *setup(), batches, exercise="Exercise 1", start_lr=1e-6, end_lr=10.0,
                               num_steps=100)
    ours = range_test(*setup(), batches, start_lr=1e-6, end_lr=10.0, num_steps=100)
    assert theirs.steps == ours.steps and theirs.diverged == ours.diverged and theirs.seconds > 0
    np.testing.assert_allclose(theirs.losses, ours.losses, rtol=1e-5)
    np.testing.assert_allclose(theirs.smoothed, ours.smoothed, rtol=1e-5)
    assert theirs.suggest() == pytest.approx(ours.suggest(), rel=1e-6)

    def stub(*args, **kwargs):
        raise NotImplementedError("range_test: Exercise 1: write it")

    with pytest.raises(NotImplementedError, match="finish Exercise 1 first"):
        record_range_test(stub, *setup(), batches, exercise="Exercise 1")


def test_suggest_applies_the_rules_it_is_given_to_copies_of_the_trimmed_curve():
    lrs, losses = known_curve()
    result = RangeTest(lrs, losses, losses.copy(), False, 0.0, {"num_steps": 41})

    def vandal(lr, loss):
        loss[:] = 0.0  # a rule that writes into its input must not change the test's curve
        return float(lr[0])

    assert result.suggest(skip_start=0, skip_end=0, rules={"first": vandal}) == {"first": lrs[0]}
    np.testing.assert_array_equal(result.smoothed, losses)


def test_the_tripwires_catch_the_library_range_test_and_its_rules_even_through_an_earlier_reference():
    early = range_test  # a reference taken before the wires are set
    model = small_net()
    with tripwires(*TWINS) as fired, pytest.raises(AssertionError, match="was called"):
        early(model, torch.optim.SGD(model.parameters(), lr=0.1), digits_batches()[:2], num_steps=5)
    assert fired
    early_rule = suggest_valley
    lrs, losses = known_curve()
    with tripwires(*TWINS), pytest.raises(AssertionError, match="was called"):
        early_rule(lrs, losses)
    from torch_lr_finder import LRFinder

    with tripwires(*TWINS), pytest.raises(AssertionError, match="was called"):
        LRFinder(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss()).range_test(
            torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 64), torch.randint(0, 10, (8,))),
                                        batch_size=4), num_iter=3)
    assert suggest_valley(lrs, losses) == pytest.approx(lrs[19]), "the wires come off after the block"


def test_exercise_rules_agree_with_the_library_on_random_curves():
    ns = exercise_namespace()
    rng = np.random.default_rng(1)
    for _ in range(100):
        n = int(rng.integers(4, 50))
        lrs = np.geomspace(1e-6, 1.0, n)
        losses = np.round(rng.normal(size=n).cumsum(), 1)
        assert ns["suggest_minimum"](lrs, losses) == suggest_minimum(lrs, losses)
        assert ns["suggest_steepest"](lrs, losses) == suggest_steepest(lrs, losses)
        assert ns["suggest_valley"](lrs, losses) == suggest_valley(lrs, losses)


# --- grading through real nbgrader -----------------------------------------------------------------
from grading import edit_solution  # noqa: E402


def _edit(grade_id: str, old: str, new: str) -> dict[str, str]:
    """A wrong variant of solution cell `grade_id`: `old` replaced by `new`."""
    return {grade_id: edit_solution(SLUG, grade_id, old, new)}


def wrong_variants() -> dict[str, dict[str, str]]:
    """Submissions with the mistakes students make; a mistake in the range test and one in a rule hit different tests."""
    range_test = {
        # The average is used as it is: it starts near 0 and "passes 4x its minimum" within 4 steps.
        "no_bias_correction": ("smooth = avg / (1 - beta ** (i + 1))", "smooth = avg"),
        # The test forgets to put the weights and the optimizer back: the model comes out trained.
        "leaves_model_trained": ("    model.load_state_dict(saved_model)\n    optimizer.load_state_dict(saved_optimizer)\n", ""),
        # No divergence stop: the test runs all its steps whatever the loss does.
        "never_stops": ("        if smooth > stop_factor * lowest:\n            break\n", ""),
        # A linear instead of an exponential schedule.
        "linear_schedule": ("lr = start_lr * (end_lr / start_lr) ** (i / (num_steps - 1))",
                            "lr = start_lr + (end_lr - start_lr) * i / (num_steps - 1)"),
        # The gradients are never cleared: every step adds its gradient to all the earlier ones.
        "no_zero_grad": ("        optimizer.zero_grad()\n", ""),
        # Only the first parameter group gets the rate (the others keep their own).
        "first_group_only": ("        for group in optimizer.param_groups:\n            group[\"lr\"] = lr\n",
                             "        optimizer.param_groups[0][\"lr\"] = lr\n"),
        # The stop compares with the first smoothed loss instead of the lowest so far.
        "stop_against_first": ("if smooth > stop_factor * lowest:", "if smooth > stop_factor * smoothed[0]:"),
        # state_dict() without a copy: it holds the live tensors, which the training changes in place.
        "state_dict_not_copied": ("saved_model = copy.deepcopy(model.state_dict())", "saved_model = model.state_dict()"),
        # The model is trained in whatever mode it came in (eval mode: batch norm uses its running statistics).
        "no_train_mode": ("    model.train()\n", ""),
    }
    rules = {
        # The rate at the minimum itself.
        "minimum_not_divided": ("suggest_minimum", "return float(lrs[np.argmin(losses)] / 10)",
                                "return float(lrs[np.argmin(losses)])"),
        # The steepest *rise* instead of the steepest descent.
        "steepest_rise": ("suggest_steepest", "return float(lrs[np.argmin(slope)])", "return float(lrs[np.argmax(slope)])"),
        # The first point where the loss turns up, not the lowest of the whole curve.
        "minimum_first_rise": ("suggest_minimum", "return float(lrs[np.argmin(losses)] / 10)",
                               "return float(lrs[int(np.argmax(np.diff(losses) > 0))] / 10)"),
        # The slope against the rate, not against log(rate).
        "steepest_against_lr": ("suggest_steepest", "np.gradient(losses, np.log(lrs))", "np.gradient(losses, lrs)"),
        # The longest contiguous decreasing run instead of the longest decreasing subsequence.
        "valley_contiguous": ("suggest_valley", "        for j in range(i):\n            if losses[j] > losses[i]:\n"
                              "                length[i] = max(length[i], length[j] + 1)\n",
                              "        if losses[i - 1] > losses[i]:\n            length[i] = length[i - 1] + 1\n"),
    }
    pairs = [("no_bias_correction", "minimum_first_rise"), ("leaves_model_trained", "steepest_against_lr"),
             ("never_stops", "valley_contiguous"), ("linear_schedule", "minimum_not_divided"),
             ("no_zero_grad", "steepest_rise"), ("first_group_only", None), ("stop_against_first", None),
             ("state_dict_not_copied", None), ("no_train_mode", None)]
    variants = {}
    for mistake, rule_mistake in pairs:
        submission = _edit("range_test", *range_test[mistake])
        if rule_mistake is not None:
            grade_id, old, new = rules[rule_mistake]
            submission.update(_edit(grade_id, old, new))
        variants[mistake if rule_mistake is None else f"{mistake}+{rule_mistake}"] = submission
    # Calling the library's twins instead of writing them: the tests' tripwires fail both.
    variants["library_twins"] = {
        "range_test": LIBRARY_RANGE_TEST,
        "suggest_valley": "def suggest_valley(lrs, losses):\n    from fasttrain.lr_finder import suggest_valley as valley\n"
                          "    return valley(lrs, losses)\n",
    }
    return variants


LIBRARY_RANGE_TEST = """def range_test(model, optimizer, batches, loss_fn=F.cross_entropy, start_lr=1e-7, end_lr=10.0,
               num_steps=100, beta=0.98, stop_factor=4.0):
    from fasttrain.lr_finder import range_test as library_range_test
    found = library_range_test(model, optimizer, batches, loss_fn, start_lr, end_lr, num_steps, beta, stop_factor)
    return [float(r) for r in found.lrs], [float(s) for s in found.smoothed]
"""

RANGE_TESTS = ["test_range_schedule", "test_range_smoothing", "test_range_stop", "test_range_trains",
               "test_range_restores"]
RULE_TESTS = ["test_suggest_minimum", "test_suggest_steepest", "test_suggest_valley"]
TESTS = tuple(RANGE_TESTS + RULE_TESTS)
LOSES = {  # the tests each mistake must fail
    "no_bias_correction": ["test_range_smoothing", "test_range_stop"],
    "leaves_model_trained": ["test_range_restores", "test_range_schedule"],  # the groups' own rates do not come back
    "never_stops": ["test_range_stop"],
    "linear_schedule": ["test_range_schedule"],
    "no_zero_grad": ["test_range_trains"],
    "first_group_only": ["test_range_schedule"],
    "stop_against_first": ["test_range_stop"],
    "state_dict_not_copied": ["test_range_restores"],
    "no_train_mode": ["test_range_trains"],
    "minimum_not_divided": ["test_suggest_minimum"],
    "steepest_rise": ["test_suggest_steepest"],
    "minimum_first_rise": ["test_suggest_minimum"],
    "steepest_against_lr": ["test_suggest_steepest"],
    "valley_contiguous": ["test_suggest_valley"],
    "library_twins": RANGE_TESTS + ["test_suggest_valley"],
}


@pytest.fixture(scope="module")
def scores():
    from grading import grade_variants

    return grade_variants(SLUG, wrong_variants(), timeout=60)


def test_solution_gets_full_marks(scores):
    assert scores["solution"]["total"] == scores["solution"]["max"] == 14


def test_blank_student_copy_scores_zero(scores):
    assert scores["blank"]["total"] == 0


def test_grading_reports_no_tampering_and_no_false_checksum_warnings(scores):
    assert "has changed" not in scores.log and "Tampering" not in scores.log, scores.log[-3000:]


@pytest.mark.parametrize("variant", list(wrong_variants()))
def test_typical_mistake_loses_the_points_of_its_test_and_keeps_the_others(scores, variant):
    lost = [t for mistake in variant.split("+") for t in LOSES[mistake]]
    s = scores[variant]
    assert all(s[t] == 0 for t in lost), f"{variant} should fail {lost}: {s}"
    kept = [t for t in TESTS if t not in lost]
    assert all(s[t] > 0 for t in kept), f"{variant} should keep the points of {kept}: {s}"


# --- the smoke run ---------------------------------------------------------------------------------
def test_smoke_run_trains_at_the_suggested_rate_to_its_target_and_records_the_sweep():
    from chapters import execute_chapter

    _, record = execute_chapter(SLUG)
    assert record["chapter"] == SLUG and record["profile"] == "smoke"
    assert record["passed"] is True, record
    assert {m["metric"] for m in record["metrics"]} >= {"suggested_lr_test_accuracy"}
    extra, seeds = record["extra"], record["settings"]["seeds"]
    assert len(extra["suggestions"]) == seeds, "one range test per seed"
    assert all(set(rules) == {"minimum/10", "steepest", "valley"} for rules in extra["suggestions"].values())
    assert len(record["settings"]["sweep_lrs"]) >= 5 and len(extra["sweep"]) == seeds
    assert len(extra["finder_seconds"]) == len(extra["sweep_seconds"]) == seeds
    assert all(t > 0 for t in extra["finder_seconds"] + extra["sweep_seconds"])
