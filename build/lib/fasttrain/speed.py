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


def training_throughput(model: torch.nn.Module, batches: Batches, device: torch.device | str, steps: int = 10,
                        warmup: int = 3, repeats: int = 1, optimizer: torch.optim.Optimizer | None = None,
                        mixed_precision: bool = False, loss_fn: Callable = F.cross_entropy) -> float:
    """Images per second of training steps on `batches` (cycled), the median over `repeats` timed runs of `steps` steps."""
    if steps < 1 or warmup < 0 or repeats < 1:
        raise ValueError(f"need steps >= 1, warmup >= 0 and repeats >= 1, got {steps}, {warmup}, {repeats}")
    device = torch.device(device)
    optimizer = optimizer if optimizer is not None else torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = TrainStep(model, optimizer, loss_fn, mixed_precision=mixed_precision, device=device, name="throughput")
    step.meter.plan(warmup + steps * repeats)
    model.train()
    stream = repeat_forever(batches)

    def one_step() -> int:
        xb, yb = next(stream)
        step(xb, yb)
        return yb.shape[0]

    for _ in range(runtime.cut(warmup, 1)):
        one_step()
    rates = []
    for _ in range(runtime.cut(repeats, 1)):
        with Timer(device) as timer:
            images = sum(one_step() for _ in range(runtime.cut(steps, 1)))
        rates.append(images / timer.seconds)
    return statistics.median(rates)


def batch_size_sweep(make_model: Callable[[], torch.nn.Module], batch_sizes: Iterable[int],
                     device: torch.device | str, images_per_point: int = 2048, min_steps: int = 3,
                     warmup: int = 2, input_shape: tuple[int, ...] = (3, 32, 32), n_classes: int = 10) -> list[dict]:
    """Training images/s of a fresh model at each batch size (random data on the device); stops at the first out-of-memory."""
    device = torch.device(device)
    rows = []
    for bs in batch_sizes:
        model = make_model().to(device)
        steps = max(min_steps, images_per_point // bs)
        try:
            rate = training_throughput(model, random_batches(bs, device, input_shape, n_classes), device,
                                       steps=steps, warmup=warmup)
        except torch.OutOfMemoryError:
            rows.append({"batch_size": bs, "images_per_s": float("nan"), "ms_per_step": float("nan"), "oom": True})
            _free_memory(device)
            break
        finally:
            del model
        rows.append({"batch_size": bs, "images_per_s": rate, "ms_per_step": 1000 * bs / rate, "oom": False})
    return rows


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
    "all": "all switches that apply (device-resident data)",
}


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
                       device: torch.device | str, batch_size: int = 256, steps: int = 10, warmup: int = 3,
                       repeats: int = 1, compile_model: bool = False, num_workers: int = 0,
                       skipped_reason: str = "skipped (compile_model=False)") -> list[dict]:
    """Training images/s with each speed switch alone, then all that apply, against the fp32 device-resident baseline.

    `images` are uint8 NCHW (CIFAR-10 as `load_cifar10` returns it), `labels` int64; a fresh model per row.
    Rows: {"switch", "label", "status" ("measured", "GPU only" or `skipped_reason`), "images_per_s", "speedup"}.
    """
    device = torch.device(device)
    if len(images) < batch_size:
        raise ValueError(f"need at least one full batch: {len(images)} images for batch_size={batch_size}")
    on_device = images.to(device), labels.to(device)
    # An untimed run first, so the baseline row does not pay the process's one-off costs (thread
    # pools, allocator, kernel libraries' first calls) that every later row would be spared.
    _measure_switches(set(), make_model, on_device, device, batch_size, 1, warmup, 1, num_workers)
    rows = []
    for switch in SWITCHES:
        row = {"switch": switch, "label": SWITCH_LABELS[switch], "status": "measured",
               "images_per_s": float("nan"), "speedup": float("nan")}
        rows.append(row)
        if not switch_applies(switch, device):
            row["status"] = "GPU only"
            continue
        if switch == "compile" and not compile_model:
            row["status"] = skipped_reason
            continue
        on = {s for s in SWITCHES if switch_applies(s, device)} - {"dataloader"} if switch == "all" else {switch}
        if "compile" in on and not compile_model:
            on.discard("compile")
        row["images_per_s"] = _measure_switches(on, make_model, on_device, device, batch_size, steps, warmup,
                                                repeats, num_workers)
    base = rows[0]["images_per_s"]
    for row in rows:
        row["speedup"] = row["images_per_s"] / base
    return rows


def _measure_switches(on: set[str], make_model: Callable[[], torch.nn.Module],
                      data: tuple[torch.Tensor, torch.Tensor], device: torch.device, batch_size: int, steps: int,
                      warmup: int, repeats: int, num_workers: int) -> float:
    """Images/s of a fresh model trained with the switches in `on` turned on and every other one off."""
    channels_last = "channels_last" in on
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = make_model().to(device, memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    trained = torch.compile(model) if "compile" in on else model
    if "dataloader" in on:
        inner = dataloader_batches(data[0], data[1], batch_size, device, num_workers)
        batches = ((xb.contiguous(memory_format=memory_format), yb) for xb, yb in repeat_forever(inner))
    else:
        batches = DeviceLoader(data[0], data[1], batch_size, drop_last=True,
                               transform=lambda xb: normalize(xb).contiguous(memory_format=memory_format))
    with backend_flags(tf32="tf32" in on, cudnn_benchmark="cudnn_benchmark" in on):
        return training_throughput(trained, batches, device, steps=steps, warmup=warmup, repeats=repeats,
                                   optimizer=optimizer, mixed_precision="autocast" in on)


# ---------------------------------------------------------------------------------------------
# The largest batch that fits
# ---------------------------------------------------------------------------------------------

class SimulatedMemoryLimit(torch.nn.Module):
    """Wrap a model so a forward pass on more than `max_batch` images raises torch.OutOfMemoryError, as a full GPU would.

    `tried` lists every batch size the wrapper was called with, so a test can count the probes.
    """

    def __init__(self, model: torch.nn.Module, max_batch: int):
        super().__init__()
        self.model, self.max_batch = model, max_batch
        self.tried: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.tried.append(x.shape[0])
        if x.shape[0] > self.max_batch:
            raise torch.OutOfMemoryError(
                f"Simulated out of memory: a batch of {x.shape[0]} images, the limit is {self.max_batch}.")
        return self.model(x)


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
