"""The training loop: a small `Learner` whose features are callbacks (metrics, timing, early stop, checkpoints, resume).

Chapter 2 builds this loop step by step. Every batch goes through one `fasttrain.step.TrainStep`
(autocast, loss, backward, clipping, optimizer and scheduler steps). The loop fires these events
on its callbacks, sorted by `order`:

    before_fit
      before_epoch
        before_batch, after_loss, after_backward, after_step, after_batch   (each training batch)
        before_validate
          before_batch, after_loss, after_batch                             (each validation batch)
        after_validate
      after_epoch
    after_fit

A callback may raise `CancelBatch`, `CancelEpoch` or `CancelFit` to cut that stage short, or set
`learner.stop_requested = True` to end training once the current epoch is over (every callback
still sees that epoch). Metrics come from the same forward pass as the update (no second pass
over the training set), and accuracy is correct/total over the whole epoch.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed, runtime
from .device import autocast, check_same_device, synchronize
from .files import save_atomically
from .step import TrainStep

EVENTS = ("before_fit", "before_epoch", "before_batch", "after_loss", "after_backward", "after_step", "after_batch",
          "before_validate", "after_validate", "after_epoch", "after_fit")


class CancelFit(Exception):
    """Raise in a callback to stop training at once."""


class CancelEpoch(Exception):
    """Raise in a callback to end the current epoch."""


class CancelBatch(Exception):
    """Raise in a callback to skip the rest of the current batch."""


class Callback:
    """Base class: define any of the methods named in EVENTS; `order` sorts callbacks (lower runs first)."""

    order = 0
    learner: "Learner"


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put `model` in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class Learner:
    """Fit `model` on `train_data` (an iterable of (x, y) batches), evaluating on `valid_data` each epoch."""

    def __init__(self, model: torch.nn.Module, train_data: Iterable, valid_data: Iterable | None = None,
                 optimizer: torch.optim.Optimizer | None = None,
                 loss_fn: Callable = F.cross_entropy, callbacks: Iterable[Callback] = (),
                 device: torch.device | str | None = None, mixed_precision: bool = False,
                 scheduler=None, clip_norm: float | None = None, clip_value: float | None = None,
                 name: str = "fit"):
        model = distributed.wrap(model)  # DistributedDataParallel under torch.distributed; as it is otherwise
        self.model, self.train_data, self.valid_data = model, train_data, valid_data
        self.optimizer = optimizer if optimizer is not None else torch.optim.Adam(model.parameters(), lr=1e-3)
        self.loss_fn, self.scheduler = loss_fn, scheduler
        first = next(model.parameters(), None)
        self.device = torch.device(device) if device is not None else (
            first.device if first is not None else torch.device("cpu"))
        self.step = TrainStep(model, self.optimizer, loss_fn, mixed_precision=mixed_precision, clip_norm=clip_norm,
                              clip_value=clip_value, scheduler=scheduler, device=self.device, name=name)
        self._eval_meter = runtime.meter("eval", f"{name} (validation)")
        self.callbacks: list[Callback] = []
        self.history: list[dict] = []
        self.start_epoch, self.stop_requested = 0, False
        self.add_callbacks([Metrics(), *callbacks])

    @property
    def n_steps(self) -> int:
        """Optimizer steps taken so far."""
        return self.step.steps

    # --- callbacks -------------------------------------------------------------------------
    def add_callbacks(self, callbacks: Iterable[Callback]) -> None:
        """Attach callbacks (kept sorted by their `order`)."""
        for cb in callbacks:
            cb.learner = self
            self.callbacks.append(cb)
        self.callbacks.sort(key=lambda c: c.order)

    def callback(self, event: str) -> None:
        """Call method `event` of every callback that has one, in order."""
        for cb in self.callbacks:
            method = getattr(cb, event, None)
            if method is not None:
                method()

    # --- the loop --------------------------------------------------------------------------
    def fit(self, epochs: int) -> list[dict]:
        """Train for `epochs` epochs (in a dry run: a few steps of at most two); return the history."""
        self.epochs, self.start_epoch, self.stop_requested = epochs, 0, False
        self._checked_devices = False
        batches = len(self.train_data) if hasattr(self.train_data, "__len__") else 0
        self.step.meter.plan(epochs * batches, _samples(self.train_data, epochs))
        if self.valid_data is not None and hasattr(self.valid_data, "__len__"):
            self._eval_meter.plan(epochs * len(self.valid_data), _samples(self.valid_data, epochs))
        try:
            self.callback("before_fit")
            for self.epoch in range(self.start_epoch, runtime.cut(epochs, runtime.DRY_EPOCHS)):
                self._epoch()
                if self.stop_requested:
                    break
        except CancelFit:
            pass
        finally:
            self.step.flush()
            self.callback("after_fit")
        return self.history

    def _epoch(self) -> None:
        self.step.epoch = self.epoch
        self.record = {"epoch": self.epoch + 1}
        try:
            self.callback("before_epoch")
            self._train_and_validate()
            if self.scheduler is not None:
                self.record["lr"] = self.optimizer.param_groups[0]["lr"]
            self.history.append(self.record)
            self.callback("after_epoch")
        except CancelEpoch:
            if not self.history or self.history[-1] is not self.record:
                self.history.append(self.record)

    def _train_and_validate(self) -> None:
        self.training = True
        self.model.train()
        self._run_batches(self.train_data)
        self.step.flush()
        if self.valid_data is not None:
            self.training = False
            with eval_mode(self.model), torch.no_grad():
                self.callback("before_validate")
                self._run_batches(self.valid_data)
                self.callback("after_validate")

    def _run_batches(self, data: Iterable) -> None:
        limit = runtime.cut(math.inf) if runtime.is_dry_run() else math.inf
        for self.batch_index, (self.xb, self.yb) in enumerate(data):
            if self.batch_index >= limit:
                break
            if not self._checked_devices:
                check_same_device(self.model, self.xb, self.yb)
                self._checked_devices = True
            try:
                self.callback("before_batch")
                if self.training:
                    self.preds, self.loss = self.step(self.xb, self.yb, events=self._step_event)
                else:
                    with self._eval_meter.measure(batch=int(self.yb.shape[0])):
                        self.preds, self.loss = self.step.forward(self.xb, self.yb)
                    self.callback("after_loss")
                self.callback("after_batch")
            except CancelBatch:
                pass

    def _step_event(self, event: str) -> None:
        if event == "after_loss":
            self.preds, self.loss = self.step.preds, self.step.loss
        self.callback(event)


def _samples(data, epochs: int) -> int | None:
    """Images in `epochs` passes over `data`, when it says (a DeviceLoader does); None otherwise."""
    n = getattr(data, "num_samples", None)
    return None if n is None else epochs * n


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

    def after_epoch(self) -> None:
        if distributed.world_size() > 1:  # sums over every process: the metrics of all the data
            self.sums = _reduce_sums(self.sums, self.learner.device)
        for split, s in self.sums.items():
            if s["n"] == 0:
                continue
            self.learner.record[f"{split}_loss"] = float(s["loss"]) / s["n"]
            if isinstance(s["correct"], torch.Tensor):
                self.learner.record[f"{split}_acc"] = int(s["correct"]) / s["n"]


def _reduce_sums(sums: dict, device: torch.device) -> dict:
    """The per-split loss, correct and n sums added over every process (every split on every process, even if empty)."""
    splits = ("train", "valid")
    values = []
    for split in splits:
        s = sums.get(split, {"loss": 0.0, "correct": None, "n": 0})
        has_correct = isinstance(s["correct"], torch.Tensor)
        values += [s["loss"], s["correct"] if has_correct else 0, s["n"], 1.0 if has_correct else 0.0]
    totals = distributed.all_reduce_sum(values, device)
    out = {}
    for i, split in enumerate(splits):
        loss, correct, n, has_correct = totals[4 * i: 4 * i + 4]
        if n > 0:
            out[split] = {"loss": loss, "correct": torch.tensor(round(correct)) if has_correct else None, "n": round(n)}
    return out


class Timing(Callback):
    """Per epoch: training seconds and images per second (device synchronised), epoch seconds, total elapsed."""

    order = 5

    def before_fit(self) -> None:
        self.total = 0.0

    def before_epoch(self) -> None:
        synchronize(self.learner.device)
        self.start, self.images, self.train_seconds = time.perf_counter(), 0, None

    def after_batch(self) -> None:
        if self.learner.training:
            self.images += self.learner.yb.shape[0]

    def before_validate(self) -> None:
        synchronize(self.learner.device)
        self.train_seconds = time.perf_counter() - self.start

    def after_epoch(self) -> None:
        synchronize(self.learner.device)
        seconds = time.perf_counter() - self.start
        train_seconds = self.train_seconds if self.train_seconds is not None else seconds
        self.total += seconds
        record = self.learner.record
        record["seconds"], record["elapsed"] = seconds, self.total
        record["train_seconds"] = train_seconds
        record["images_per_s"] = self.images / train_seconds if train_seconds > 0 else math.nan


class StopWhen(Callback):
    """End training after the first epoch whose record satisfies `condition` (every callback still sees that epoch)."""

    order = 20

    def __init__(self, condition: Callable[[dict], bool]):
        self.condition = condition

    def after_epoch(self) -> None:
        if self.condition(self.learner.record):
            self.learner.stop_requested = True


class Checkpoint(Callback):
    """Keep the weights of the epoch with the best value of `metric` (in memory, or also saved to `path`)."""

    order = 30

    def __init__(self, metric: str = "valid_acc", mode: str = "max", path: str | None = None):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.metric, self.mode, self.path = metric, mode, path
        self.best, self.state, self.best_epoch = -math.inf if mode == "max" else math.inf, None, None

    def after_epoch(self) -> None:
        value = self.learner.record.get(self.metric)
        if value is None:
            return
        better = value > self.best if self.mode == "max" else value < self.best
        if better:
            self.best, self.best_epoch = value, self.learner.record["epoch"]
            model = distributed.unwrap(self.learner.model)
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if self.path and distributed.is_main():
                save_atomically(self.state, Path(self.path))

    def restore(self) -> None:
        """Load the best weights seen back into the model."""
        if self.state is None:
            raise RuntimeError(f"No epoch recorded {self.metric!r}: nothing to restore")
        distributed.unwrap(self.learner.model).load_state_dict(self.state)


def rng_state() -> dict:
    """The state of every random number generator a training run draws from (Python, NumPy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Resume(Callback):
    """Save the whole training state at `path` after every epoch (atomically); resume from it when it exists.

    The state is the model, the optimizer, the step (GradScaler, scheduler, step count), every
    random generator (also the loaders' shuffling and augmentation generators), the history and
    the epoch. Running the same training again after an interruption continues from the last
    finished epoch and ends with the same weights as an uninterrupted run with the same seed.
    """

    order = 100

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def _data_states(self) -> dict:
        lrn = self.learner
        return {name: data.state_dict() for name, data in (("train", lrn.train_data), ("valid", lrn.valid_data))
                if data is not None and hasattr(data, "state_dict")}

    def _fingerprint(self) -> list:
        return [list(p.shape) for p in self.learner.model.parameters()]

    def before_fit(self) -> None:
        if not self.path.exists():
            return
        lrn = self.learner
        state = torch.load(self.path, map_location=lrn.device, weights_only=False)
        if state["fingerprint"] != self._fingerprint() or state["epochs"] != lrn.epochs:
            raise RuntimeError(
                f"The saved training state {self.path} belongs to another training (a different model or number of "
                f"epochs). Delete it to start afresh, or give this training its own path.")
        distributed.unwrap(lrn.model).load_state_dict(state["model"])
        lrn.optimizer.load_state_dict(state["optimizer"])
        lrn.step.load_state_dict(state["step"])
        own = state
        if "ranks" in state or distributed.world_size() > 1:  # every process resumes its own generators
            if len(state.get("ranks", [])) != distributed.world_size():
                raise RuntimeError(
                    f"The saved training state {self.path} was written by {len(state.get('ranks', [])) or 1} "
                    f"process(es), and {distributed.world_size()} are resuming it: resume with as many processes, "
                    f"or delete it to start afresh.")
            own = state["ranks"][distributed.rank()]
        set_rng_state(own["rng"])
        for name, data in (("train", lrn.train_data), ("valid", lrn.valid_data)):
            if name in own["data"]:
                data.load_state_dict(own["data"][name])
        lrn.history[:] = state["history"]
        lrn.start_epoch = state["epoch"] + 1
        self.resumed_from = lrn.start_epoch
        if state.get("stopped"):
            lrn.start_epoch = lrn.epochs
        if distributed.is_main():
            print(f"Resumed {lrn.step.name!r} from {self.path.name} after epoch {state['epoch'] + 1} of {lrn.epochs}")

    def after_epoch(self) -> None:
        lrn = self.learner
        state = {"model": distributed.unwrap(lrn.model).state_dict(), "optimizer": lrn.optimizer.state_dict(),
                 "step": lrn.step.state_dict(), "rng": rng_state(), "data": self._data_states(),
                 "history": list(lrn.history), "epoch": lrn.epoch, "epochs": lrn.epochs,
                 "stopped": lrn.stop_requested, "fingerprint": self._fingerprint()}
        if distributed.world_size() > 1:  # each process's generators; rank 0 writes them all
            state["ranks"] = distributed.gather_objects({"rng": state["rng"], "data": state["data"]})
        if distributed.is_main():
            save_atomically(state, self.path)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Iterable, loss_fn: Callable = F.cross_entropy,
             mixed_precision: bool = False) -> dict:
    """Loss and accuracy of `model` over all of `data` (correct/total, loss weighted by batch size).

    Under torch.distributed a sharded DeviceLoader gives each process its shard: call evaluate on every
    process, and the sums are added over them (each gets the result for all of `data`).
    """
    first = next(model.parameters())
    device = first.device
    total_loss = torch.zeros((), device=device)
    correct, n = torch.zeros((), device=device, dtype=torch.long), 0
    m = runtime.meter("eval", "evaluate")
    m.plan(len(data) if hasattr(data, "__len__") else 0, _samples(data, 1))
    limit = runtime.cut(math.inf) if runtime.is_dry_run() else math.inf
    with eval_mode(model):
        for i, (xb, yb) in enumerate(data):
            if i >= limit:
                break
            check_same_device(model, xb, yb)
            with m.measure(batch=int(yb.shape[0])), autocast(device, enabled=mixed_precision):
                preds = model(xb)
                loss = loss_fn(preds, yb)
            total_loss += loss.float() * yb.shape[0]
            correct += (preds.argmax(dim=1) == yb).sum()
            n += yb.shape[0]
    if getattr(data, "_sharded", lambda: False)():  # each process evaluated its shard: add them up (call on all)
        total_loss, correct, n = distributed.all_reduce_sum([total_loss, correct, n], device)
        n = round(n)
    if n == 0:
        raise ValueError("evaluate() got no batches")
    return {"loss": float(total_loss) / n, "acc": int(correct) / n}
