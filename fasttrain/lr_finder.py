"""The learning-rate range test: sweep the rate up exponentially, watch the smoothed loss, suggest a rate.

The test follows Leslie Smith ("Cyclical Learning Rates for Training Neural Networks", 2015)
as Sylvain Gugger describes it ("How Do You Find A Good Learning Rate", 2017) and fastai
implements it: start at a tiny rate, multiply it by the same factor after every step, follow an
exponentially weighted average of the loss (bias-corrected, as in Adam), stop once that
average passes `stop_factor` times its minimum, and put the model and the optimizer back
exactly as they were. Three rules turn the curve into a rate: the rate at the minimum divided
by 10, the steepest descent, and fastai's "valley".

`lr_sweep` is the brute-force alternative the chapter compares it with: one training per rate,
each from the same initial weights and on the same batches. `record_range_test` runs a range test
written as the chapter's exercise and keeps what it saw as a `RangeTest`; `TWINS` lists what a
test of that exercise must not let a submission call instead of writing it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from . import runtime
from .batches import repeat_forever
from .device import Timer, check_same_device, seed_everything
from .step import NonFiniteLossError, TrainStep

# --- the pieces ---------------------------------------------------------------------------
def exponential_lrs(start_lr: float, end_lr: float, num_steps: int) -> np.ndarray:
    """The rates of an exponential sweep: `start_lr` at step 0, `end_lr` at step `num_steps - 1`."""
    if not (0 < start_lr < end_lr):
        raise ValueError(f"Need 0 < start_lr < end_lr, got start_lr={start_lr!r}, end_lr={end_lr!r}: "
                         f"the range test sweeps the rate upwards, e.g. from 1e-7 to 10.")
    if num_steps < 2:
        raise ValueError(f"num_steps must be at least 2 to sweep a range, got {num_steps!r}")
    return start_lr * (end_lr / start_lr) ** (np.arange(num_steps) / (num_steps - 1))


def smooth_losses(losses: Iterable[float], beta: float = 0.98) -> np.ndarray:
    """The bias-corrected exponentially weighted average of `losses` (the first value is the first loss)."""
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta!r} (0.98 averages over about 50 steps)")
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * float(loss)
        out.append(avg / (1 - beta ** (i + 1)))
    return np.asarray(out, dtype=float)


def trim(lrs: np.ndarray, losses: np.ndarray, skip_start: int = 0, skip_end: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Drop `skip_start` points at the start and `skip_end` at the end (the noisy start and the blow-up)."""
    lrs, losses = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    if lrs.shape != losses.shape:
        raise ValueError(f"lrs and losses must have the same length, got {lrs.shape} and {losses.shape}")
    stop = len(lrs) - skip_end
    if stop - skip_start < 2:
        raise ValueError(f"Only {len(lrs)} points: too few to drop {skip_start} at the start and {skip_end} at the "
                         f"end and keep two. Run the range test for more steps (or with a later end_lr).")
    return lrs[skip_start:stop], losses[skip_start:stop]


# --- the suggestion rules -------------------------------------------------------------------
def suggest_minimum(lrs: np.ndarray, losses: np.ndarray) -> float:
    """The rate at the lowest (smoothed) loss, divided by 10."""
    lrs, losses = trim(lrs, losses)
    return float(lrs[np.argmin(losses)] / 10)


def suggest_steepest(lrs: np.ndarray, losses: np.ndarray) -> float:
    """The rate where the loss falls fastest against log(rate) (central differences, one-sided at the ends)."""
    lrs, losses = trim(lrs, losses)
    slope = np.gradient(losses, np.log(lrs))
    return float(lrs[np.argmin(slope)])


def suggest_valley(lrs: np.ndarray, losses: np.ndarray) -> float:
    """fastai's "valley": about halfway along the longest decreasing stretch of the loss curve.

    The stretch is the longest strictly decreasing subsequence of the losses: it ends at
    index `end` and is `length` points long; fastai counts it from `start = end - length` (one
    step before its first point) and picks `start + int(span / 3) + int(span / 3 / 2)`, with
    `span = end - start`. On a curve that never falls fastai's index can come out as -1 (the
    last rate); here it is 0 (the first).
    """
    lrs, losses = trim(lrs, losses)
    n = len(losses)
    length = np.ones(n, dtype=int)
    for i in range(1, n):
        higher_before = losses[:i] > losses[i]
        if higher_before.any():
            length[i] = 1 + length[:i][higher_before].max()
    end = int(np.argmax(length))  # the first index where the longest run ends
    start = end - int(length[end])
    third = (end - start) / 3
    return float(lrs[max(start + int(third) + int(third / 2), 0)])


RULES: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "minimum/10": suggest_minimum,
    "steepest": suggest_steepest,
    "valley": suggest_valley,
}


# --- the range test -------------------------------------------------------------------------
@dataclass
class RangeTest:
    """What a range test saw: the rate, raw loss and smoothed loss of every step, and why it stopped."""

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    diverged: bool
    seconds: float
    settings: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        """How many steps the test ran."""
        return len(self.lrs)

    def default_skips(self) -> tuple[int, int]:
        """fastai's trimming: a tenth of the planned steps at the start, 5 points at the end."""
        planned = self.settings.get("num_steps", self.steps)
        return planned // 10, min(5, max(self.steps - planned // 10 - 2, 0))

    def suggest(self, skip_start: int | None = None, skip_end: int | None = None,
                rules: dict[str, Callable] | None = None) -> dict[str, float]:
        """The rate each rule suggests (default: `RULES`), from the smoothed curve trimmed of its noisy start and blow-up."""
        default_start, default_end = self.default_skips()
        lrs, losses = trim(self.lrs, self.smoothed,
                           default_start if skip_start is None else skip_start,
                           default_end if skip_end is None else skip_end)
        return {name: float(rule(lrs.copy(), losses.copy())) for name, rule in (rules or RULES).items()}

    def plot(self, suggestions: dict[str, float] | None = None, ax=None, title: str = ""):
        """Loss against rate on a log axis (raw and smoothed), each suggestion marked; returns the axes."""
        return plot_range_test(self, suggestions, ax=ax, title=title)


def _snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Copies of everything the range test changes: weights, buffers, gradients, optimizer state, train mode."""
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()],
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "training": model.training,
    }


def _restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, snapshot: dict) -> None:
    """Put the model and the optimizer back exactly as `_snapshot` found them."""
    model.load_state_dict(snapshot["model"])
    for p, g in zip(model.parameters(), snapshot["grads"]):
        p.grad = g
    optimizer.load_state_dict(snapshot["optimizer"])
    model.train(snapshot["training"])


def range_test(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: Iterable,
               loss_fn: Callable = F.cross_entropy, start_lr: float = 1e-7, end_lr: float = 10.0,
               num_steps: int = 100, beta: float = 0.98, stop_factor: float = 4.0,
               mixed_precision: bool = False, board=None) -> RangeTest:
    """Run the learning-rate range test on `model`, then restore the model and optimizer bit for bit.

    Step i trains on one batch at rate `start_lr * (end_lr / start_lr) ** (i / (num_steps - 1))`
    (every parameter group gets it) and records that batch's loss. The test stops early at the
    first step whose smoothed loss exceeds `stop_factor` times the lowest smoothed loss so far
    (that step is kept), or whose loss is not finite. `data` yields (x, y) batches on the
    model's device and is iterated again when it runs out. `board`, if given (for example a
    `fasttrain.board.LiveBoard(xlabel="learning rate", logx=True)`), is sent each step's values.
    """
    if stop_factor <= 1:
        raise ValueError(f"stop_factor must be > 1 (the test stops when the loss passes stop_factor x its "
                         f"minimum), got {stop_factor!r}")
    lrs = exponential_lrs(start_lr, end_lr, num_steps)
    first = next(model.parameters(), None)
    if first is None:
        raise ValueError("The model has no parameters: there is nothing for a range test to train.")
    step = TrainStep(model, optimizer, loss_fn, mixed_precision=mixed_precision, device=first.device,
                     name="range test")
    _plan_fixed_steps(step.meter, num_steps, getattr(data, "batch_size", None))
    snapshot = _snapshot(model, optimizer)
    losses, best, diverged = [], math.inf, False
    batches = repeat_forever(data)
    model.train()
    try:
        with Timer(first.device) as timer:
            for i in range(runtime.cut(num_steps)):
                lr = float(lrs[i])
                for group in optimizer.param_groups:
                    group["lr"] = lr
                xb, yb = next(batches)
                if i == 0:
                    check_same_device(model, xb, yb)
                try:
                    _, loss = step(xb, yb)
                except NonFiniteLossError:
                    losses.append(float(step.loss.detach()))  # the loss blew up: the test ends on this step
                    diverged = True
                    break
                losses.append(float(loss.detach()))
                smooth = float(smooth_losses(losses, beta)[-1])
                best = min(best, smooth)
                if board is not None:
                    board.log(lr, loss=losses[-1], smoothed=smooth)
                if not math.isfinite(smooth) or smooth > stop_factor * best:
                    diverged = True
                    break
    finally:
        _restore(model, optimizer, snapshot)
        if board is not None:
            board.close()
    smoothed = smooth_losses(losses, beta)
    n = len(losses)
    return RangeTest(lrs[:n].copy(), np.asarray(losses), smoothed, diverged, timer.seconds,
                     {"start_lr": start_lr, "end_lr": end_lr, "num_steps": runtime.cut(num_steps), "beta": beta,
                      "stop_factor": stop_factor})


def _plan_fixed_steps(meter, num_steps: int, batch: int | None) -> None:
    """Plan a loop of `num_steps` steps whatever the batch: in a dry run on a smaller batch, steps of the profile's batch."""
    run = runtime.current_run()
    factor = 1.0
    for change in (run.dry_overrides.values() if run is not None else ()):
        dry, full = change.get("dry_value"), change.get("profile_value")
        if isinstance(dry, int) and isinstance(full, int) and batch == dry and full > dry:
            factor = full / dry  # costs.summarize_meters scales steps at the dry batch back by dry / full
    meter.plan(round(num_steps * factor), None if batch is None else round(num_steps * batch * factor))


def record_range_test(range_test_fn: Callable, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      data: Iterable, loss_fn: Callable = F.cross_entropy, *, exercise: str = "the range test",
                      start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100, **settings) -> RangeTest:
    """Run `range_test_fn(model, optimizer, data, loss_fn, start_lr=, end_lr=, num_steps=, **settings) -> (rates, smoothed)`
    (a range test written as an exercise) and keep what it saw as a `RangeTest`.

    Each batch's loss is recorded through the loss function, and the test is timed. In a dry run
    the test runs only a few steps (its rates then span the range in those steps) and its cost
    counts `num_steps` steps. A stub that raises NotImplementedError stops here with a message
    naming `exercise`.
    """
    first = next(model.parameters(), None)
    if first is None:
        raise ValueError("The model has no parameters: there is nothing for a range test to train.")
    raw: list[float] = []
    batches: list[int] = []

    def recorded_loss(preds, target):
        loss = loss_fn(preds, target)
        raw.append(float(loss.detach()))
        batches.append(int(target.shape[0]))
        return loss

    steps = max(runtime.cut(num_steps), 2)
    meter = runtime.meter("train", "range test")
    try:
        with Timer(first.device) as timer, meter.measure(low_precision=False):
            rates, smoothed = range_test_fn(model, optimizer, data, recorded_loss, start_lr=start_lr, end_lr=end_lr,
                                            num_steps=steps, **settings)
    except NotImplementedError as exc:
        raise NotImplementedError(f"This experiment runs your code: finish {exercise} first, check it with the "
                                  f"tests below it, then run this cell again ({exc})") from None
    rates, smoothed = np.asarray(rates, dtype=float), np.asarray(smoothed, dtype=float)
    if len(rates) != len(smoothed) or len(rates) == 0 or len(rates) > steps:
        raise ValueError(f"{exercise} returned {len(rates)} rates and {len(smoothed)} losses for a test of {steps} "
                         f"steps: return one rate and one smoothed loss per step taken")
    if isinstance(meter, runtime.CostMeter) and meter.flops is not None:
        taken = max(len(raw), 1)
        meter.flops, meter.ops = meter.flops / taken, round(meter.ops / taken)  # one step's share of the test
        meter.batch = batches[0] if batches else None
    _plan_fixed_steps(meter, num_steps, batches[0] if batches else None)
    return RangeTest(rates, np.asarray(raw[:len(rates)], dtype=float), smoothed, len(rates) < steps, timer.seconds,
                     {"start_lr": start_lr, "end_lr": end_lr, "num_steps": steps, **settings})


# What a test of the range-test exercise trips on (fasttrain.checks.tripwires): this module's range
# test and the pieces it calls at run time (so that a reference taken before the wires were set is
# caught too), and the torch-lr-finder package's.
TWINS = ("fasttrain.lr_finder.range_test", "fasttrain.lr_finder.record_range_test", "fasttrain.lr_finder.exponential_lrs",
         "fasttrain.lr_finder.smooth_losses", "fasttrain.lr_finder._snapshot", "fasttrain.lr_finder.repeat_forever",
         "fasttrain.lr_finder.trim", "fasttrain.lr_finder.suggest_minimum", "fasttrain.lr_finder.suggest_steepest",
         "fasttrain.lr_finder.suggest_valley", "fasttrain.lr_finder.RangeTest.suggest",
         "torch_lr_finder.lr_finder.LRFinder.range_test", "torch_lr_finder.lr_finder.LRFinder._train_batch",
         "torch_lr_finder.lr_finder.LRFinder.plot")


# --- the plot -------------------------------------------------------------------------------
def plot_range_test(result: RangeTest, suggestions: dict[str, float] | None = None, ax=None, title: str = ""):
    """Raw and smoothed loss against the rate on a log axis, each suggested rate marked on the smoothed curve."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(result.lrs, result.losses, color="0.75", lw=0.8, label="loss of each batch")
    ax.plot(result.lrs, result.smoothed, color="C0", lw=2, label="smoothed (bias-corrected)")
    markers = {"minimum/10": "v", "steepest": "o", "valley": "s"}
    for k, (name, lr) in enumerate((suggestions or {}).items()):
        y = float(np.interp(np.log(lr), np.log(result.lrs), result.smoothed))
        ax.axvline(lr, color=f"C{k + 1}", lw=0.8, ls="--")
        ax.plot([lr], [y], marker=markers.get(name, "D"), color=f"C{k + 1}", ms=9, ls="none",
                label=f"{name}: {lr:.2g}")
    ax.set_xscale("log")
    finite = np.concatenate([result.smoothed, result.losses])
    low, start = float(np.min(finite[np.isfinite(finite)])), float(result.smoothed[0])
    span = max(start - low, 0.05 * abs(low), 1e-6)  # show the descent; cut the blow-up off the top
    ax.set_ylim(low - 0.1 * span, low + 1.6 * span)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(title or f"range test: {result.steps} steps" + (", stopped at divergence" if result.diverged else ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return ax


# --- the brute-force alternative ------------------------------------------------------------
def lr_sweep(make_model: Callable[[], torch.nn.Module], make_optimizer: Callable[[Iterable, float], torch.optim.Optimizer],
             train_data: Iterable, valid_data: Iterable, lrs: Iterable[float], epochs: int = 1, seed: int = 0,
             loss_fn: Callable = F.cross_entropy, mixed_precision: bool = False,
             schedule: Callable[[torch.optim.Optimizer, int], object] | None = None) -> list[dict]:
    """Train a fresh model for `epochs` at each rate, every one from the same initial weights and on the same batches.

    `make_model()` is called after seeding with `seed`, so every rate starts from the same weights;
    a `train_data` that keeps a random state (a seeded `DeviceLoader`: shuffle and augmentation)
    is put back to the state it had on entry before each rate, so every rate sees the same batches.
    `make_optimizer(params, lr)` builds the optimizer; `schedule(optimizer, total_steps)`, if
    given, builds a torch LR scheduler stepped after every batch. Each dict holds lr, the final
    train/valid loss and accuracy, the per-epoch history and the seconds that training took
    (device synchronised). In a dry run only a few rates train (`fasttrain.runtime.each`).
    """
    from .train import Learner, evaluate

    start_state = train_data.state_dict() if hasattr(train_data, "state_dict") else None
    rows = []
    for lr in runtime.each(list(lrs)):
        if start_state is not None:
            train_data.load_state_dict(copy.deepcopy(start_state))
        seed_everything(seed)
        model = make_model()
        optimizer = make_optimizer(model.parameters(), float(lr))
        scheduler = schedule(optimizer, epochs * len(train_data)) if schedule is not None else None
        learner = Learner(model, train_data, None, optimizer, loss_fn, mixed_precision=mixed_precision,
                          scheduler=scheduler, name="lr sweep")
        first = next(model.parameters())
        with Timer(first.device) as timer:
            history = learner.fit(epochs)
        valid = evaluate(model, valid_data, loss_fn, mixed_precision)
        last = history[-1] if history else {}
        rows.append({"lr": float(lr), "train_loss": last.get("train_loss", math.nan),
                     "train_acc": last.get("train_acc", math.nan), "valid_loss": valid["loss"],
                     "valid_acc": valid["acc"], "seconds": timer.seconds,
                     "history": [{k: v for k, v in h.items() if k in ("epoch", "train_loss", "train_acc")}
                                 for h in history]})
    return rows
