"""Where to compute and in what precision: device choice, seeding, autocast, synced timing."""

from __future__ import annotations

import contextlib
import os
import random
import time

import numpy as np
import torch


def get_device(preference: str | torch.device | None = "auto", verbose: bool = True) -> torch.device:
    """Return the device to use: cuda > mps > cpu for "auto", else the one named."""
    if isinstance(preference, torch.device):
        device = preference
    elif preference in (None, "", "auto"):
        if torch.cuda.is_available():
            device = torch.device("cuda")
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
    else:
        device = torch.device(preference)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"device={preference!r} was asked for but CUDA is not available here; "
                "pass device='auto' (or 'cpu') to run on what this machine has."
            )
    if verbose:
        print(f"Using device: {device_name(device)}")
    return device


def device_name(device: torch.device | str) -> str:
    """A human-readable name of the device, e.g. 'cuda (NVIDIA H100 80GB HBM3)' or 'cpu (2 threads)'."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        n = torch.get_num_threads()
        return f"cpu ({n} thread{'s' if n != 1 else ''})"
    return device.type


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def default_threads() -> int:
    """Threads for torch on the CPU: $OMP_NUM_THREADS when set, else the cores this process may use."""
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


# The dry run of a full profile forces a low-precision dtype on the CPU, so that the bf16 path and
# the fp16-with-GradScaler path both run on a machine without a GPU (see `fasttrain.runtime`).
_forced_autocast: dict[str, torch.dtype | None] = {}


def force_autocast_dtype(dtype: torch.dtype | None, device_type: str = "cpu") -> None:
    """Make `autocast_dtype` answer `dtype` for every device of `device_type` (None undoes it)."""
    if dtype is None:
        _forced_autocast.pop(device_type, None)
    elif dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast runs in torch.bfloat16 or torch.float16, not {dtype}")
    else:
        _forced_autocast[device_type] = dtype


def has_native_bf16(device: torch.device | str) -> bool:
    """True on a CUDA GPU whose tensor cores compute in bf16 (compute capability 8.0 or more: A100, RTX 30xx, H100).

    `torch.cuda.is_bf16_supported()` also answers True on older GPUs (a T4 or a V100), where bf16
    is emulated and slow; fp16 with a GradScaler is the fast choice there.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def has_amx_bf16() -> bool:
    """True where the CPU multiplies bf16 matrices in hardware (Intel AMX: Xeon Sapphire Rapids and later).

    There, oneDNN runs bf16 convolutions several times faster than fp32 ones (measured on a 2-core
    AMX Xeon, channels_last, two threads: 2.1x for the recipe's 32/64/128 net, 3.5x at 64/256/256).
    Without AMX, bf16 on a CPU is emulated or barely faster, and fp32 stays the CPU's dtype.
    """
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if probe is not None:
        try:
            return bool(probe()) and bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)())
        except RuntimeError:
            return False
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def autocast_dtype(device: torch.device | str, cpu: bool = False) -> torch.dtype | None:
    """The low-precision dtype that suits the device: bf16 where the GPU has it natively, else fp16.

    On a CPU: None (fp32), unless `cpu=True` and the CPU has AMX (`has_amx_bf16`), then bf16. The
    chapters keep fp32 on every CPU, so that their CPU numbers do not depend on the CPU's generation;
    the fastest recipe asks for `cpu=True`, since its point is speed.
    """
    device = torch.device(device)
    if device.type in _forced_autocast:
        return _forced_autocast[device.type]
    if device.type == "cuda":
        return torch.bfloat16 if has_native_bf16(device) else torch.float16
    if device.type == "mps":
        return torch.float16
    if device.type == "cpu" and cpu and has_amx_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device | str, enabled: bool = True, cpu: bool = False):
    """A context that runs the forward pass in the device's autocast dtype (a no-op where there is none).

    `cpu=True` lets a CPU with AMX run in bf16 (see `autocast_dtype`)."""
    device = torch.device(device)
    dtype = autocast_dtype(device, cpu=cpu)
    if not enabled or dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def needs_grad_scaler(device: torch.device | str) -> bool:
    """True when the autocast dtype is fp16, whose small range needs a GradScaler."""
    return autocast_dtype(device) == torch.float16


def synchronize(device: torch.device | str) -> None:
    """Wait until all queued work on the device is done (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Timer:
    """Wall-clock timer that synchronises the device on entry and exit: `with Timer(dev) as t: ...; t.seconds`."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seconds = float("nan")

    def __enter__(self) -> "Timer":
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


def check_same_device(model: torch.nn.Module, *tensors: torch.Tensor) -> None:
    """Raise a clear error when the model's parameters and the batch are not on the same device."""
    param = next(model.parameters(), None)
    if param is None:
        return
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device != param.device:
            raise RuntimeError(
                f"The model is on {param.device} but the batch is on {t.device}. "
                f"Move the model with `model.to(device)` (or the batch with `.to(device)`) so both are on "
                f"the same device; a model left on the CPU while the data is on the GPU is the classic "
                f"reason a 'GPU' run takes an hour."
            )
