"""Training speed: images per second (synchronised, after warm-up), batch-size sweeps, the speed
switches table, and the largest batch that fits in memory.

Every measurement times whole training steps (forward, loss, backward, optimizer step) with the
device synchronised before and after (`fasttrain.device.Timer`), after a few warm-up steps that
absorb one-off costs: memory allocation, cuDNN's algorithm search, torch.compile's compilation.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from . import runtime
from .batches import DeviceLoader, normalize, repeat_forever
from .device import Timer, autocast, autocast_dtype
from .step import TrainStep
from .tables import format_table

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# Throughput of training steps
# ---------------------------------------------------------------------------------------------

def random_batches(batch_size: int, device: torch.device | str, input_shape: tuple[int, ...] = (3, 32, 32),
                   n_classes: int = 10, channels_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One random batch on the device, yielded forever: measures compute alone, with no data cost."""
    x = torch.randn(batch_size, *input_shape, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, n_classes, (batch_size,), device=device)
    return itertools.repeat((x, y))


class StepTimer:
    """Training steps of one model on cycled `batches`, ready to be warmed up and then timed (device synchronised).

    `warm_up(steps)` runs untimed steps (allocation, cuDNN's search, torch.compile's compilation)
    and keeps their seconds in `warmup_seconds`; `rate(steps)` is the images/s of `steps` timed
    steps. Several timers can be timed in turns, so that a drift of the machine's speed spreads
    over all of them instead of falling on one.
    """

    def __init__(self, model: torch.nn.Module, batches: Batches, device: torch.device | str,
                 optimizer: torch.optim.Optimizer | None = None, mixed_precision: bool = False,
                 loss_fn: Callable = F.cross_entropy, flags: dict | None = None, name: str = "throughput"):
        self.device = torch.device(device)
        optimizer = optimizer if optimizer is not None else torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.model, self.flags = model, dict(flags or {})
        self.step = TrainStep(model, optimizer, loss_fn, mixed_precision=mixed_precision, device=self.device, name=name)
        self.stream = repeat_forever(batches)
        self.warmup_seconds = 0.0

    def plan(self, steps: int) -> None:
        """Count `steps` planned steps towards a dry run's cost estimate."""
        self.step.meter.plan(steps)

    def _run(self, steps: int) -> int:
        self.model.train()
        images = 0
        with backend_flags(**self.flags):
            for _ in range(steps):
                xb, yb = next(self.stream)
                self.step(xb, yb)
                images += yb.shape[0]
        return images

    def warm_up(self, steps: int) -> None:
        """Untimed steps (at most one in a dry run); their seconds, compilation included, go to `warmup_seconds`."""
        with Timer(self.device) as timer:
            self._run(runtime.cut(steps, 1))
        self.warmup_seconds += timer.seconds

    def rate(self, steps: int) -> float:
        """Images per second of `steps` training steps (one in a dry run), timed between two synchronisations."""
        with Timer(self.device) as timer:
            images = self._run(runtime.cut(steps, 1))
        return images / timer.seconds


def throughput_runs(model: torch.nn.Module, batches: Batches, device: torch.device | str, steps: int = 10,
                    warmup: int = 3, repeats: int = 1, optimizer: torch.optim.Optimizer | None = None,
                    mixed_precision: bool = False, loss_fn: Callable = F.cross_entropy) -> list[float]:
    """Images per second of each of `repeats` timed runs of `steps` training steps on `batches` (cycled), after `warmup`."""
    if steps < 1 or warmup < 0 or repeats < 1:
        raise ValueError(f"need steps >= 1, warmup >= 0 and repeats >= 1, got {steps}, {warmup}, {repeats}")
    timer = StepTimer(model, batches, device, optimizer, mixed_precision, loss_fn)
    timer.plan(warmup + steps * repeats)
    timer.warm_up(warmup)
    return [timer.rate(steps) for _ in range(runtime.cut(repeats, 1))]


def training_throughput(model: torch.nn.Module, batches: Batches, device: torch.device | str, steps: int = 10,
                        warmup: int = 3, repeats: int = 1, optimizer: torch.optim.Optimizer | None = None,
                        mixed_precision: bool = False, loss_fn: Callable = F.cross_entropy) -> float:
    """Images per second of training steps on `batches` (cycled), the median over `repeats` timed runs of `steps` steps."""
    return statistics.median(throughput_runs(model, batches, device, steps, warmup, repeats, optimizer,
                                             mixed_precision, loss_fn))


def _spread(rates: list[float]) -> dict:
    """The median of repeated measurements, their lowest and highest values, and the values themselves."""
    return {"images_per_s": statistics.median(rates), "low": min(rates), "high": max(rates), "runs": list(rates)}


def batch_size_sweep(make_model: Callable[[], torch.nn.Module], batch_sizes: Iterable[int],
                     device: torch.device | str, images_per_point: int = 2048, min_steps: int = 3,
                     warmup: int = 2, repeats: int = 1, input_shape: tuple[int, ...] = (3, 32, 32),
                     n_classes: int = 10) -> list[dict]:
    """Training images/s of a fresh model at each batch size (random data on the device); stops at the first out-of-memory.

    Every size is warmed up first; then the sizes are timed in turns, `repeats` rounds of about
    `images_per_point` images each, so that a drift of the machine's speed spreads over the whole
    curve instead of bending it at one point. Each row: batch_size, images_per_s (the median of the
    rounds), low and high (their extremes), runs, ms_per_step and oom.
    """
    device = torch.device(device)
    rows, timers = [], {}
    for bs in batch_sizes:
        try:
            timer = StepTimer(make_model().to(device), random_batches(bs, device, input_shape, n_classes), device)
            timer.plan(warmup + max(min_steps, images_per_point // bs) * repeats)
            timer.warm_up(warmup)
        except torch.OutOfMemoryError:
            rows.append(_out_of_memory_row(bs))
            _free_memory(device)
            break
        timers[bs] = timer
    runs = {bs: [] for bs in timers}
    for round_ in range(runtime.cut(repeats, 1)):
        for bs in _rotated(list(timers), round_):
            if bs not in timers:
                continue
            try:
                runs[bs].append(timers[bs].rate(max(min_steps, images_per_point // bs)))
            except torch.OutOfMemoryError:      # only without warm-up: this size and every larger one are out
                rows = [_out_of_memory_row(bs)]
                for larger in [b for b in timers if b >= bs]:
                    del timers[larger]
                _free_memory(device)
    measured = []
    for bs in timers:
        row = {"batch_size": bs, **_spread(runs[bs])}
        measured.append({**row, "ms_per_step": 1000 * bs / row["images_per_s"], "oom": False})
    return measured + rows


def _out_of_memory_row(batch_size: int) -> dict:
    nan = float("nan")
    return {"batch_size": batch_size, "images_per_s": nan, "low": nan, "high": nan, "runs": [], "ms_per_step": nan,
            "oom": True}


def _rotated(items: list, k: int) -> list:
    """`items` starting at position k (mod len): each round of a timing starts with another row."""
    k %= max(1, len(items))
    return items[k:] + items[:k]


# ---------------------------------------------------------------------------------------------
# The speed switches
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def backend_flags(tf32: bool = False, cudnn_benchmark: bool = False):
    """Set TF32 (matmul and convolutions) and cudnn.benchmark for the duration of the block, then restore them."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = (matmul.fp32_precision, conv.fp32_precision, torch.backends.cudnn.benchmark)
    precision = "tf32" if tf32 else "ieee"
    try:
        matmul.fp32_precision, conv.fp32_precision = precision, precision
        torch.backends.cudnn.benchmark = cudnn_benchmark
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision, torch.backends.cudnn.benchmark = saved


def dataloader_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device | str,
                       num_workers: int = 0) -> torch.utils.data.DataLoader:
    """The tutorial data path: a DataLoader collating CPU samples one by one, normalised on the CPU, moved per batch."""
    device = torch.device(device)
    dataset = _PerSampleCIFAR(images.cpu(), labels.cpu())
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                                         pin_memory=device.type == "cuda", drop_last=True,
                                         persistent_workers=num_workers > 0)
    return _ToDevice(loader, device)


class _PerSampleCIFAR(torch.utils.data.Dataset):
    """uint8 CHW images returned one at a time as normalised float tensors (what ToTensor + Normalize do)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return normalize(self.images[i : i + 1])[0], self.labels[i]


class _ToDevice:
    """Wrap a DataLoader so each batch is copied to the device (non-blocking from pinned memory)."""

    def __init__(self, loader: torch.utils.data.DataLoader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for xb, yb in self.loader:
            yield xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)


SWITCHES = ("baseline", "channels_last", "autocast", "tf32", "cudnn_benchmark", "compile", "dataloader", "all")
SWITCH_LABELS = {
    "baseline": "baseline: fp32, data resident on the device",
    "channels_last": "channels_last memory format",
    "autocast": "autocast (bf16, or fp16 with a GradScaler)",
    "tf32": "TF32 matmuls and convolutions",
    "cudnn_benchmark": "cudnn.benchmark",
    "compile": "torch.compile",
    "dataloader": "DataLoader instead of device-resident data",
    "all": "together: every measured switch but compile and the DataLoader",
}
# The switches the "all" row never includes: the DataLoader is the slow path, not a switch to turn
# on, and compiling takes longer than a short training saves (the chapter's final trainer leaves it out).
_NOT_IN_ALL = {"baseline", "dataloader", "compile", "all"}


def switch_applies(switch: str, device: torch.device | str) -> bool:
    """Whether a speed switch does anything on this device (TF32, cudnn.benchmark: CUDA only; autocast: GPUs only)."""
    device = torch.device(device)
    if switch not in SWITCHES:
        raise ValueError(f"Unknown speed switch {switch!r}: use one of {SWITCHES}")
    if switch in ("tf32", "cudnn_benchmark"):
        return device.type == "cuda"
    if switch == "autocast":
        return autocast_dtype(device) is not None
    return True


def speed_switch_table(make_model: Callable[[], torch.nn.Module], images: torch.Tensor, labels: torch.Tensor,
                       device: torch.device | str, switches: Iterable[str] = SWITCHES, batch_size: int = 256,
                       steps: int = 10, warmup: int = 3, repeats: int = 3, num_workers: int = 0,
                       compile_options: dict | None = None,
                       skipped_reason: str = "not measured in this run") -> list[dict]:
    """Training images/s with each speed switch alone, then the switches together, against the fp32 device-resident baseline.

    `images` are uint8 NCHW (CIFAR-10 as `load_cifar10` returns it), `labels` int64. Every switch in
    `switches` gets a fresh model; after every row's warm-up, the rows are timed in turns, `repeats`
    rounds (each starting with another row), so that a drift of the machine's speed spreads over all of them. The other rows say
    "GPU only" (the switch does nothing on this device) or `skipped_reason`. `compile_options` go to
    `torch.compile`. Rows: {"switch", "label", "status", "images_per_s" (median), "low", "high",
    "runs", "speedup" (median over the baseline's), "warmup_seconds"}.
    """
    device = torch.device(device)
    asked = set(switches)
    if asked - set(SWITCHES) or "baseline" not in asked:
        raise ValueError(f"switches must include 'baseline' and name only {SWITCHES}, got {sorted(asked)}")
    switches = [s for s in SWITCHES if s in asked]
    if len(images) < batch_size:
        raise ValueError(f"need at least one full batch: {len(images)} images for batch_size={batch_size}")
    on_device = images.to(device), labels.to(device)
    together = {s for s in switches if s not in _NOT_IN_ALL}
    rows, timers = [], {}
    for switch in SWITCHES:
        row = {"switch": switch, "label": SWITCH_LABELS[switch], "status": "measured", "images_per_s": float("nan"),
               "low": float("nan"), "high": float("nan"), "runs": [], "speedup": float("nan"),
               "warmup_seconds": float("nan")}
        rows.append(row)
        if switch not in switches:
            row["status"] = "GPU only" if not switch_applies(switch, device) else skipped_reason
            continue
        on = together if switch == "all" else ({switch} - {"baseline"})
        timers[switch] = _switch_timer(on, make_model, on_device, device, batch_size, num_workers, compile_options)
        timers[switch].plan(warmup + steps * repeats)
        timers[switch].warm_up(warmup)
    runs = {switch: [] for switch in timers}
    for round_ in range(runtime.cut(repeats, 1)):
        for switch in _rotated(list(timers), round_):
            runs[switch].append(timers[switch].rate(steps))
    for row in rows:
        if row["switch"] in timers:
            row.update(_spread(runs[row["switch"]]), warmup_seconds=timers[row["switch"]].warmup_seconds)
    base = rows[0]["images_per_s"]
    for row in rows:
        row["speedup"] = row["images_per_s"] / base
    return rows


def _switch_timer(on: set[str], make_model: Callable[[], torch.nn.Module], data: tuple[torch.Tensor, torch.Tensor],
                  device: torch.device, batch_size: int, num_workers: int, compile_options: dict | None) -> StepTimer:
    """Training steps of a fresh model with the switches in `on` turned on and every other one off."""
    memory_format = torch.channels_last if "channels_last" in on else torch.contiguous_format
    model = make_model().to(device, memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    trained = torch.compile(model, **(compile_options or {})) if "compile" in on else model
    if "dataloader" in on:
        inner = dataloader_batches(data[0], data[1], batch_size, device, num_workers)
        batches = ((xb.contiguous(memory_format=memory_format), yb) for xb, yb in repeat_forever(inner))
    else:
        batches = DeviceLoader(data[0], data[1], batch_size, drop_last=True,
                               transform=lambda xb: normalize(xb).contiguous(memory_format=memory_format))
    return StepTimer(trained, batches, device, optimizer, mixed_precision="autocast" in on,
                     flags={"tf32": "tf32" in on, "cudnn_benchmark": "cudnn_benchmark" in on},
                     name=f"speed switches: {' + '.join(sorted(on)) or 'baseline'}")


# ---------------------------------------------------------------------------------------------
# The largest batch that fits
# ---------------------------------------------------------------------------------------------

class SimulatedMemoryLimit(torch.nn.Module):
    """Wrap a model so that a training step on more than `max_batch` images runs out of memory, as on a full GPU.

    As on a GPU, the training step needs more memory than the forward pass alone: a forward pass
    (with or without gradients) of up to `forward_factor * max_batch` images runs, and the backward
    pass of a batch above `max_batch` raises `torch.OutOfMemoryError`, so a probe that never runs
    the backward pass finds too large a batch. `tried` lists the batch size of every forward call.
    """

    def __init__(self, model: torch.nn.Module, max_batch: int, forward_factor: float = 2.0):
        super().__init__()
        self.model, self.max_batch, self.forward_factor = model, max_batch, forward_factor
        self.tried: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        self.tried.append(n)
        if n > self.forward_factor * self.max_batch:
            raise torch.OutOfMemoryError(_simulated_oom(n, "forward", self.forward_factor * self.max_batch))
        out = self.model(x)
        if n > self.max_batch and torch.is_grad_enabled() and out.requires_grad:
            out = _OutOfMemoryInBackward.apply(out, _simulated_oom(n, "backward", self.max_batch))
        return out


def _simulated_oom(n: int, where: str, limit: float) -> str:
    return f"Simulated out of memory in the {where} pass: a batch of {n} images, the limit is {int(limit)}."


class _OutOfMemoryInBackward(torch.autograd.Function):
    """The identity, whose backward pass raises torch.OutOfMemoryError (the batch's gradients do not fit)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, message: str) -> torch.Tensor:
        ctx.message = message
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise torch.OutOfMemoryError(ctx.message)


def fits_in_memory(model: torch.nn.Module, batch_size: int, device: torch.device | str,
                   input_shape: tuple[int, ...] = (3, 32, 32), n_classes: int = 10,
                   mixed_precision: bool = False) -> bool:
    """Whether one training step (forward, loss, backward) at `batch_size` runs without running out of memory."""
    device = torch.device(device)
    try:
        _probe_step(model, batch_size, device, input_shape, n_classes, mixed_precision)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
        _free_memory(device)


def _probe_step(model: torch.nn.Module, batch_size: int, device: torch.device, input_shape: tuple[int, ...],
                n_classes: int, mixed_precision: bool) -> None:
    """Forward and backward on random data; its tensors die when it returns or raises."""
    x = torch.randn(batch_size, *input_shape, device=device)
    y = torch.randint(0, n_classes, (batch_size,), device=device)
    with autocast(device, enabled=mixed_precision):
        loss = F.cross_entropy(model(x), y)
    loss.backward()


def _free_memory(device: torch.device) -> None:
    """Hand cached blocks back to the GPU after an out-of-memory error (nothing to do on the CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def largest_batch_size(model: torch.nn.Module, device: torch.device | str, input_shape: tuple[int, ...] = (3, 32, 32),
                       n_classes: int = 10, start: int = 16, max_batch: int = 2**14, margin: float = 0.9,
                       mixed_precision: bool = False) -> int:
    """The largest training batch that fits, times a safety `margin`: double from `start`, then bisect back.

    Doubling finds a size that fits and one that does not (or reaches `max_batch`); bisecting
    between them finds the largest size that fits; the margin leaves room for what the probe
    does not allocate (optimizer state, fragmentation). At least 1.
    """
    if start < 1 or max_batch < start:
        raise ValueError(f"need 1 <= start <= max_batch, got start={start}, max_batch={max_batch}")
    if not 0 < margin <= 1:
        raise ValueError(f"margin must lie in (0, 1], got {margin}")

    def fits(n: int) -> bool:
        return fits_in_memory(model, n, device, input_shape, n_classes, mixed_precision)

    if fits(start):                       # double until a size fails, or the cap fits
        good = start
        while good < max_batch:
            size = min(2 * good, max_batch)
            if not fits(size):
                bad = size
                break
            good = size
        else:
            return max(1, int(good * margin))
    else:                                 # `start` itself fails: halve until a size fits
        bad = start
        while True:
            size = bad // 2
            if size == 0:
                raise RuntimeError("Not even a batch of 1 fits in memory: use a smaller model or input, "
                                   "mixed precision (mixed_precision=True), or free what other tensors hold.")
            if fits(size):
                good = size
                break
            bad = size
    while bad - good > 1:                 # bisect: `good` fits, `bad` does not
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return max(1, int(good * margin))
