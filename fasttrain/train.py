"""The training loop: a small `Learner` whose features are callbacks (metrics, timing, clipping, schedules).

The loop calls `before_<event>` / `after_<event>` on its callbacks, sorted by `order`, for the
events fit, epoch, batch, loss, backward and step. A callback can raise `CancelBatch`,
`CancelEpoch` or `CancelFit` to cut that stage short.

Metrics come from the same forward pass as the update (no second pass over the training
set), and accuracy is correct/total over the whole epoch.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .device import autocast, check_same_device, needs_grad_scaler, synchronize


class CancelFit(Exception):
    """Raise in a callback to stop training."""


class CancelEpoch(Exception):
    """Raise in a callback to end the current epoch."""


class CancelBatch(Exception):
    """Raise in a callback to skip the rest of the current batch."""


class Callback:
    """Base class: override any of before_/after_ fit, epoch, batch, loss, backward, step."""

    order = 0
    learner: "Learner"


class Learner:
    """Fit `model` on `train_data` (an iterable of (x, y) batches), evaluating on `valid_data` each epoch."""

    def __init__(self, model: torch.nn.Module, train_data: Iterable, valid_data: Iterable | None = None,
                 optimizer: torch.optim.Optimizer | None = None,
                 loss_fn: Callable = F.cross_entropy, callbacks: Iterable[Callback] = (),
                 device: torch.device | str | None = None, mixed_precision: bool = False):
        self.model, self.train_data, self.valid_data = model, train_data, valid_data
        self.optimizer = optimizer if optimizer is not None else torch.optim.Adam(model.parameters(), lr=1e-3)
        self.loss_fn = loss_fn
        first = next(model.parameters(), None)
        self.device = torch.device(device) if device is not None else (
            first.device if first is not None else torch.device("cpu"))
        self.mixed_precision = mixed_precision
        self.scaler = torch.amp.GradScaler(self.device.type) if mixed_precision and needs_grad_scaler(self.device) else None
        self.callbacks: list[Callback] = []
        self.history: list[dict] = []
        self.add_callbacks([Metrics(), *callbacks])

    # --- callbacks -------------------------------------------------------------------------
    def add_callbacks(self, callbacks: Iterable[Callback]) -> None:
        """Attach callbacks (kept sorted by their `order`)."""
        for cb in callbacks:
            cb.learner = self
            self.callbacks.append(cb)
        self.callbacks.sort(key=lambda c: c.order)

    def callback(self, name: str) -> None:
        for cb in self.callbacks:
            method = getattr(cb, name, None)
            if method is not None:
                method()

    def _stage(self, name: str, fn: Callable, cancel: type[Exception]) -> None:
        try:
            self.callback(f"before_{name}")
            fn()
            self.callback(f"after_{name}")
        except cancel:
            pass

    # --- the loop --------------------------------------------------------------------------
    def fit(self, epochs: int) -> list[dict]:
        """Train for `epochs` epochs; return the history (one dict per epoch)."""
        self.epochs, self.n_steps = epochs, 0
        self._checked_devices = False
        try:
            self.callback("before_fit")
            for self.epoch in range(epochs):
                self.record = {"epoch": self.epoch + 1}
                self._stage("epoch", self._one_epoch, CancelEpoch)
                self.history.append(self.record)
        except CancelFit:
            pass
        finally:
            self.callback("after_fit")
        return self.history

    def _one_epoch(self) -> None:
        self.training = True
        self.model.train()
        self._run_batches(self.train_data)
        if self.valid_data is not None:
            self.training = False
            self.model.eval()
            with torch.no_grad():
                self._run_batches(self.valid_data)
            self.callback("after_validate")

    def _run_batches(self, data: Iterable) -> None:
        for self.batch_index, (self.xb, self.yb) in enumerate(data):
            if not self._checked_devices:
                check_same_device(self.model, self.xb, self.yb)
                self._checked_devices = True
            self._stage("batch", self._one_batch, CancelBatch)

    def _one_batch(self) -> None:
        with autocast(self.device, enabled=self.mixed_precision):
            self.preds = self.model(self.xb)
            self.loss = self.loss_fn(self.preds, self.yb)
        self.callback("after_loss")
        if not self.training:
            return
        if self.scaler is not None:
            self.scaler.scale(self.loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            self.loss.backward()
        self.callback("after_backward")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.n_steps += 1
        self.callback("after_step")
        self.optimizer.zero_grad(set_to_none=True)


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      scaler: "torch.amp.GradScaler | None" = None) -> None:
    """Backpropagate `loss` and take one optimizer step, through the GradScaler when there is one."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


class Metrics(Callback):
    """Loss and accuracy per epoch, from the training forward pass; correct/total over the whole epoch."""

    order = -10

    def before_epoch(self) -> None:
        self.sums = {}

    def after_loss(self) -> None:
        lrn = self.learner
        split = "train" if lrn.training else "valid"
        n = lrn.yb.shape[0]
        with torch.no_grad():
            loss = lrn.loss.detach().float() * n
            correct = (lrn.preds.detach().argmax(dim=1) == lrn.yb).sum() if lrn.preds.ndim == 2 else None
        s = self.sums.setdefault(split, {"loss": 0.0, "correct": 0, "n": 0})
        s["loss"] = s["loss"] + loss  # kept on the device: no synchronisation per batch
        if correct is not None:
            s["correct"] = s["correct"] + correct
        s["n"] += n

    def after_validate(self) -> None:
        self._write()

    def after_epoch(self) -> None:
        self._write()

    def _write(self) -> None:
        for split, s in self.sums.items():
            if s["n"] == 0:
                continue
            self.learner.record[f"{split}_loss"] = float(s["loss"]) / s["n"]
            if isinstance(s["correct"], torch.Tensor):
                self.learner.record[f"{split}_acc"] = int(s["correct"]) / s["n"]


class Timing(Callback):
    """Seconds per epoch (device synchronised) and images per second, written into each record."""

    order = 5

    def before_fit(self) -> None:
        self.total = 0.0

    def before_epoch(self) -> None:
        synchronize(self.learner.device)
        self.start, self.images = time.perf_counter(), 0

    def after_batch(self) -> None:
        if self.learner.training:
            self.images += self.learner.yb.shape[0]

    def after_epoch(self) -> None:
        synchronize(self.learner.device)
        seconds = time.perf_counter() - self.start
        self.total += seconds
        self.learner.record["seconds"] = seconds
        self.learner.record["elapsed"] = self.total


class GradClip(Callback):
    """Clip the gradient norm (or each value) before every optimizer step."""

    def __init__(self, max_norm: float | None = None, max_value: float | None = None):
        if (max_norm is None) == (max_value is None):
            raise ValueError("GradClip needs exactly one of max_norm or max_value")
        self.max_norm, self.max_value = max_norm, max_value

    def after_backward(self) -> None:
        params = self.learner.model.parameters()
        if self.max_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.max_norm)
        else:
            torch.nn.utils.clip_grad_value_(params, self.max_value)


class Scheduler(Callback):
    """Step a torch LR scheduler after every optimizer step; log the learning rate."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def after_step(self) -> None:
        self.scheduler.step()

    def after_epoch(self) -> None:
        self.learner.record["lr"] = self.learner.optimizer.param_groups[0]["lr"]


class StopWhen(Callback):
    """Stop training as soon as `condition(record)` is true at the end of an epoch."""

    order = 20

    def __init__(self, condition: Callable[[dict], bool]):
        self.condition = condition

    def after_epoch(self) -> None:
        if self.condition(self.learner.record):
            self.learner.history.append(self.learner.record)
            raise CancelFit


class Checkpoint(Callback):
    """Keep the weights of the epoch with the best value of `metric` (in memory, or saved to `path`)."""

    order = 30

    def __init__(self, metric: str = "valid_acc", mode: str = "max", path: str | None = None):
        self.metric, self.mode, self.path = metric, mode, path
        self.best, self.state = -math.inf if mode == "max" else math.inf, None

    def after_epoch(self) -> None:
        value = self.learner.record.get(self.metric)
        if value is None:
            return
        better = value > self.best if self.mode == "max" else value < self.best
        if better:
            self.best = value
            self.state = {k: v.detach().clone() for k, v in self.learner.model.state_dict().items()}
            if self.path:
                torch.save(self.state, self.path)

    def restore(self) -> None:
        """Load the best weights seen back into the model."""
        if self.state is None:
            raise RuntimeError(f"No epoch recorded {self.metric!r}: nothing to restore")
        self.learner.model.load_state_dict(self.state)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Iterable, loss_fn: Callable = F.cross_entropy,
             mixed_precision: bool = False) -> dict:
    """Loss and accuracy of `model` over all of `data` (correct/total, loss weighted by batch size)."""
    was_training = model.training
    model.eval()
    first = next(model.parameters())
    total_loss, correct, n = torch.zeros((), device=first.device), torch.zeros((), device=first.device, dtype=torch.long), 0
    for xb, yb in data:
        check_same_device(model, xb, yb)
        with autocast(first.device, enabled=mixed_precision):
            preds = model(xb)
            loss = loss_fn(preds, yb)
        total_loss += loss.float() * yb.shape[0]
        correct += (preds.argmax(dim=1) == yb).sum()
        n += yb.shape[0]
    model.train(was_training)
    if n == 0:
        raise ValueError("evaluate() got no batches")
    return {"loss": float(total_loss) / n, "acc": int(correct) / n}
