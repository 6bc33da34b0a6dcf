"""Learning-rate schedules: the one-cycle policy (with momentum cycling), linear warm-up, RAdam's rectification.

`one_cycle` gives the learning rate and momentum of Leslie Smith's one-cycle policy at one step,
with the same conventions as `torch.optim.lr_scheduler.OneCycleLR` (two phases by default,
`three_phase=True` for the paper's original), so the two agree step by step.
`OneCycle` applies it to an optimizer; `LinearWarmup` puts a linear warm-up in front of any
scheduler; `radam_rectification` is the factor by which RAdam damps its adaptive step while the
second-moment estimate is still noisy (Liu et al., 2020): a warm-up that RAdam builds in.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def anneal(start: float, end: float, pct: float, strategy: str = "cos") -> float:
    """Interpolate from `start` (pct=0) to `end` (pct=1): half a cosine ("cos") or a straight line ("linear")."""
    if strategy == "cos":
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)
    if strategy == "linear":
        return start + (end - start) * pct
    raise ValueError(f"anneal strategy must be 'cos' or 'linear', got {strategy!r}")


def one_cycle_phases(total_steps: int, pct_start: float = 0.3, three_phase: bool = False) -> list[tuple[float, str, str, str, str]]:
    """The phases as (end_step, start_lr, end_lr, start_momentum, end_momentum) with OneCycleLR's boundaries."""
    if three_phase:
        return [
            (float(pct_start * total_steps) - 1, "initial", "max", "max", "base"),
            (float(2 * pct_start * total_steps) - 2, "max", "initial", "base", "max"),
            (float(total_steps - 1), "initial", "min", "max", "max"),
        ]
    return [
        (float(pct_start * total_steps) - 1, "initial", "max", "max", "base"),
        (float(total_steps - 1), "max", "min", "base", "max"),
    ]


def one_cycle(step: int, total_steps: int, max_lr: float, pct_start: float = 0.3, anneal_strategy: str = "cos",
              div_factor: float = 25.0, final_div_factor: float = 1e4, three_phase: bool = False,
              base_momentum: float = 0.85, max_momentum: float = 0.95) -> tuple[float, float]:
    """The (learning rate, momentum) of the one-cycle policy at `step` (0 = before the first update)."""
    if not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if not 0.0 < pct_start < 1.0:
        raise ValueError(f"pct_start must lie strictly between 0 and 1, got {pct_start!r}")
    if not 0 <= step <= total_steps:
        raise ValueError(f"step {step} is outside the cycle: the schedule has {total_steps} steps (0..{total_steps})")
    lrs = {"initial": max_lr / div_factor, "max": max_lr}
    lrs["min"] = lrs["initial"] / final_div_factor
    moms = {"base": base_momentum, "max": max_momentum}
    phases = one_cycle_phases(total_steps, pct_start, three_phase)
    start_step = 0.0
    for i, (end_step, lr0, lr1, m0, m1) in enumerate(phases):
        if step <= end_step or i == len(phases) - 1:
            pct = (step - start_step) / (end_step - start_step)
            return (anneal(lrs[lr0], lrs[lr1], pct, anneal_strategy),
                    anneal(moms[m0], moms[m1], pct, anneal_strategy))
        start_step = end_step
    raise AssertionError("unreachable: the last phase always matches")


def set_momentum(optimizer: torch.optim.Optimizer, momentum: float) -> None:
    """Set the momentum of every parameter group: `momentum` for SGD-like optimizers, beta1 for Adam-like ones."""
    for group in optimizer.param_groups:
        if "betas" in group:
            group["betas"] = (momentum, *group["betas"][1:])
        elif "momentum" in group:
            group["momentum"] = momentum
        else:
            raise ValueError(f"{type(optimizer).__name__} has neither 'momentum' nor 'betas': "
                             "pass cycle_momentum=False to cycle only the learning rate")


class OneCycle:
    """Drive an optimizer's learning rate (and momentum) along `one_cycle`; call `.step()` after each update.

    `schedule` replaces `one_cycle` by any function with its signature that returns the pair
    (learning rate, momentum), for example a student's own version of it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_lr: float | list[float], total_steps: int,
                 cycle_momentum: bool = True, schedule: Callable[..., tuple[float, float]] | None = None, **kwargs):
        self.optimizer, self.total_steps, self.cycle_momentum = optimizer, total_steps, cycle_momentum
        self.schedule = schedule if schedule is not None else one_cycle
        n = len(optimizer.param_groups)
        self.max_lrs = list(max_lr) if isinstance(max_lr, (list, tuple)) else [max_lr] * n
        if len(self.max_lrs) != n:
            raise ValueError(f"got {len(self.max_lrs)} max_lr values for {n} parameter groups")
        self.kwargs = kwargs
        self.last_step = -1
        self.step()

    def step(self) -> None:
        """Move one step along the cycle and write the learning rate (and momentum) into the optimizer."""
        self.last_step += 1
        momentum = None
        for group, max_lr in zip(self.optimizer.param_groups, self.max_lrs):
            group["lr"], momentum = self.schedule(self.last_step, self.total_steps, max_lr, **self.kwargs)
        if self.cycle_momentum:
            set_momentum(self.optimizer, momentum)

    def get_last_lr(self) -> list[float]:
        """The learning rates last written, one per parameter group."""
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = state["last_step"] - 1
        self.step()


class LinearWarmup:
    """Scale the learning rates of any scheduler by min(1, (t + 1) / warmup_steps) at step t.

    The wrapped scheduler keeps seeing its own, unscaled learning rates (they are restored before
    each of its steps), so schedulers that update `lr` recursively (ExponentialLR, StepLR, ...)
    are not compounded with the warm-up factor.
    """

    def __init__(self, scheduler, warmup_steps: int):
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an int >= 1, got {warmup_steps!r}")
        self.scheduler, self.warmup_steps = scheduler, warmup_steps
        self.optimizer = scheduler.optimizer
        self.t = 0
        self._apply()

    def factor(self) -> float:
        """The warm-up factor at the current step."""
        return min(1.0, (self.t + 1) / self.warmup_steps)

    def _apply(self) -> None:
        self.unscaled = [g["lr"] for g in self.optimizer.param_groups]
        for g, lr in zip(self.optimizer.param_groups, self.unscaled):
            g["lr"] = lr * self.factor()

    def step(self) -> None:
        """Step the wrapped scheduler on its unscaled rates, then apply the warm-up factor of the next step."""
        for g, lr in zip(self.optimizer.param_groups, self.unscaled):
            g["lr"] = lr
        self.scheduler.step()
        self.t += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        """The learning rates last written, one per parameter group."""
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"t": self.t, "unscaled": list(self.unscaled), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.t, self.unscaled = state["t"], list(state["unscaled"])
        for g, lr in zip(self.optimizer.param_groups, self.unscaled):
            g["lr"] = lr * self.factor()


def radam_rho(step: int, beta2: float = 0.999) -> tuple[float, float]:
    """(rho_t, rho_inf): the effective number of squared gradients in Adam's bias-corrected average at `step` (1-based)."""
    if step < 1:
        raise ValueError(f"step counts updates from 1, got {step}")
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    return rho_inf - 2.0 * step * beta2 ** step / (1.0 - beta2 ** step), rho_inf


# Liu et al. (2020) show that the adaptive step's variance is finite only for rho_t > 4; RAdam
# takes its adaptive step only once rho_t > 5, the margin PyTorch's implementation uses.
RADAM_THRESHOLD = 5.0


def radam_rectification(step: int, beta2: float = 0.999) -> float | None:
    """RAdam's variance rectification r_t at `step` (1-based); None while rho_t <= 5 (no adaptive step yet)."""
    rho_t, rho_inf = radam_rho(step, beta2)
    if rho_t <= RADAM_THRESHOLD:
        return None
    return math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
