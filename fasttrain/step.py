"""One training step, the same for every loop of the course (the Learner, the range test, the speed timer, the recipe).

A step runs the forward pass and the loss under autocast in the dtype that suits the device
(`fasttrain.device.autocast_dtype`: bf16 on GPUs that have it natively, fp16 below that), checks
that the loss is finite, backpropagates (through a `GradScaler` whenever the dtype is fp16, whose
narrow range lets small gradients underflow to zero), unscales and clips the gradients if asked,
and takes the optimizer step and then the scheduler step.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F

from . import runtime
from .device import autocast_dtype

# On a GPU a finiteness check per step would make the CPU wait for the GPU at every step; there the
# check is folded into a flag on the device and read every this many steps (and at `flush`).
CHECK_EVERY = 50


class NonFiniteLossError(FloatingPointError):
    """The training loss became inf or NaN."""


class TrainStep:
    """forward (autocast) -> loss -> finite? -> backward (scaled for fp16) -> unscale, clip -> optimizer step -> scheduler step.

    `events`, if given to `__call__`, is called with "after_loss", "after_backward" and
    "after_step" between the phases (the Learner passes its callbacks this way); `preds` and
    `loss` hold the current batch's predictions and loss by then.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable = F.cross_entropy,
                 mixed_precision: bool = False, clip_norm: float | None = None, clip_value: float | None = None,
                 scheduler=None, device: torch.device | str | None = None, name: str = "training",
                 cpu_autocast: bool = False):
        if clip_norm is not None and clip_value is not None:
            raise ValueError("give at most one of clip_norm (clip the gradients' total norm) and clip_value (clip each entry)")
        self.model, self.optimizer, self.loss_fn, self.scheduler = model, optimizer, loss_fn, scheduler
        self.clip_norm, self.clip_value, self.name = clip_norm, clip_value, name
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else "cpu"
        self.device = torch.device(device)
        # cpu_autocast: bf16 on a CPU with AMX too (`fasttrain.device.autocast_dtype`); the chapters keep fp32 there.
        self.dtype = autocast_dtype(self.device, cpu=cpu_autocast) if mixed_precision else None
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        self.steps = 0           # optimizer steps taken
        self.epoch: int | None = None
        self._first_bad: torch.Tensor | None = None
        self.meter = runtime.meter("train", name)

    # --- the phases -----------------------------------------------------------------------
    def autocast(self):
        """The autocast context of this step's dtype (a no-op in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def forward(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions and loss of a batch, under autocast."""
        with self.autocast():
            preds = self.model(xb)
            loss = self.loss_fn(preds, yb)
        return preds, loss

    def backward(self, loss: torch.Tensor) -> None:
        """Check the loss, clear old gradients, backpropagate (scaled when the dtype is fp16)."""
        self._check_finite(loss)
        self.optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def update(self) -> None:
        """Unscale and clip the gradients if asked, take the optimizer step, then the scheduler step."""
        if self.clip_norm is not None or self.clip_value is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            if self.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, self.clip_norm)
            else:
                torch.nn.utils.clip_grad_value_(params, self.clip_value)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)   # skipped when the gradients hold inf/NaN
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1
        if self.device.type == "cuda" and self.steps % CHECK_EVERY == 0:
            self.flush()

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor,
                 events: Callable[[str], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One whole training step on a batch; returns (predictions, loss)."""
        with self.meter.measure(batch=int(yb.shape[0]), low_precision=self.dtype is not None):
            preds, loss = self.preds, self.loss = self.forward(xb, yb)
            if events is not None:
                events("after_loss")
            self.backward(loss)
            if events is not None:
                events("after_backward")
            self.update()
        if events is not None:
            events("after_step")
        return preds, loss

    # --- non-finite losses ----------------------------------------------------------------
    def _check_finite(self, loss: torch.Tensor) -> None:
        if self.device.type != "cuda":
            if not torch.isfinite(loss.detach()).all():
                self._raise(float(loss.detach().float().reshape(-1)[0]), self.steps)
            return
        bad = ~torch.isfinite(loss.detach()).all()
        step = torch.tensor(self.steps, device=self.device)
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, device=self.device, dtype=torch.long)
        self._first_bad = torch.where(bad & (self._first_bad < 0), step, self._first_bad)

    def flush(self) -> None:
        """Read the device-side finiteness flag (on a GPU) and raise if a loss was inf or NaN."""
        if self._first_bad is not None:
            first = int(self._first_bad)
            if first >= 0:
                self._raise(float("nan"), first)

    def _raise(self, value: float, step: int) -> None:
        where = f"epoch {self.epoch + 1}, " if self.epoch is not None else ""
        value_text = "inf or NaN" if math.isnan(value) and self.device.type == "cuda" else f"{value}"
        raise NonFiniteLossError(
            f"The training loss of {self.name!r} became {value_text} at {where}step {step + 1}; training stopped. "
            f"Likely causes: a learning rate too high for this model (lower it, or warm it up: chapter 6); "
            f"fp16 overflow in the forward pass (train in bf16 or fp32, or scale the inputs down); "
            f"or inf/NaN values in the data.")

    # --- resuming -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What resuming needs beyond the model and optimizer: the scaler, the scheduler and the step count."""
        return {"steps": self.steps,
                "scaler": None if self.scaler is None else self.scaler.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
