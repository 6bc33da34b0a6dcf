"""Data-parallel training with torch.distributed: one process per device, started by torchrun.

`torchrun --nproc-per-node N script.py` starts N copies of a script and tells each one its
place through environment variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
`init()` joins the process group they describe (nccl between GPUs, gloo on CPUs) and returns
the process's device. From then on the library is data-parallel by itself:

- the `Learner` wraps its model in `DistributedDataParallel` (`wrap`), which averages the
  gradients over the processes during the backward pass;
- a `DeviceLoader` gives each process its own shard of every epoch's shuffle (`shard`): every
  process draws the same permutation from the seed and takes every N-th index of it;
- the Learner's metrics are sums of loss, correct and total, all-reduced over the processes at
  the end of each epoch (`all_reduce_sum`), so they equal those of one process on all the data;
- the board, printed lines, checkpoints and results records come from rank 0 only (`is_main`).

Everything here is a no-op in one process with no process group set up, so the same script runs
as `python script.py` and as `torchrun --nproc-per-node N script.py`.

Also here: `SyncBatchNorm2d` (BatchNorm whose statistics cover the whole global batch, on CPUs
too: torch's `nn.SyncBatchNorm` runs on GPUs only), `PerDeviceBatchNorm2d` (what BatchNorm
computes when a batch is split over N devices, simulated in one process), `launch_local` (run a
function in N forked processes joined by gloo, for tests and exercises), and the helpers that
bring a torchrun job's dry-run cost meters back to the notebook that launched it.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ---------------------------------------------------------------------------------------------
# Where this process stands
# ---------------------------------------------------------------------------------------------

def is_distributed() -> bool:
    """True when this process belongs to an initialised torch.distributed process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 with one process)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """How many processes train together (1 with one process)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK; 0 with one process)."""
    return int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else 0


def is_main() -> bool:
    """True on rank 0, the process that prints, draws and writes files (always True with one process)."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) set this process's RANK and WORLD_SIZE."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def main_only(fn: Callable) -> Callable:
    """Decorate a function that writes or prints: it runs on rank 0 only (and returns None elsewhere)."""
    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        return fn(*args, **kwargs) if is_main() else None
    return guarded


# ---------------------------------------------------------------------------------------------
# Joining and leaving the process group
# ---------------------------------------------------------------------------------------------

def default_backend(device: torch.device | str | None = None) -> str:
    """nccl between CUDA GPUs, gloo otherwise (CPUs)."""
    if device is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init(backend: str | None = None, device: str | torch.device | None = None,
         timeout_s: float = 600.0) -> torch.device:
    """Join the process group torchrun describes and return this process's device; outside torchrun, just the device.

    `device` "cuda" (or None with GPUs present) gives each process the GPU of its LOCAL_RANK;
    "cpu" (or None without GPUs) keeps every process on the CPU, where gloo connects them.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} GPU(s): start "
                               f"torchrun with --nproc-per-node {torch.cuda.device_count()} or fewer")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not is_distributed():
        backend = backend or default_backend(device)
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return device


def cleanup() -> None:
    """Leave the process group (a no-op with one process)."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every process gets here (a no-op with one process)."""
    if is_distributed():
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# The model: DistributedDataParallel
# ---------------------------------------------------------------------------------------------

def is_wrapped(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def wrap(model: nn.Module, **ddp_options) -> nn.Module:
    """`model` in DistributedDataParallel under torch.distributed; unchanged with one process or if already wrapped.

    DDP copies rank 0's weights and buffers to every process when it is built, then averages the
    gradients over the processes during every backward pass (bucket by bucket, while the backward
    pass goes on). `ddp_options` go to DDP (e.g. bucket_cap_mb).
    """
    if world_size() == 1 or is_wrapped(model):
        return model
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, **ddp_options)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if is_wrapped(model) else model


# ---------------------------------------------------------------------------------------------
# Data: each process its own shard of every epoch
# ---------------------------------------------------------------------------------------------

def shard(order: torch.Tensor, pad: bool = True, drop_tail: bool = False) -> torch.Tensor:
    """This process's share of `order`: every world_size-th index, starting at its rank.

    Strided shards make the batches of one step, taken together over the processes, exactly one
    batch of a single process with world_size times the batch size. With `pad` the order is first
    extended by its own first indices to a multiple of world_size (every process gets as many
    samples, as torch's DistributedSampler does: training needs the same number of steps
    everywhere); with `drop_tail` it is cut to a multiple instead; with neither, the shards
    differ by at most one sample (exact for evaluation).
    """
    world, r = world_size(), rank()
    if world == 1:
        return order
    n = len(order)
    if drop_tail:
        order = order[: n - n % world]
    elif pad and n % world:
        repeats = -(-(world - n % world) // max(n, 1))
        order = torch.cat([order, order.repeat(repeats)[: world - n % world]])
    return order[r::world]


def shard_size(n: int, pad: bool = True, drop_tail: bool = False) -> int:
    """How many of n samples `shard` gives this process."""
    world, r = world_size(), rank()
    if world == 1:
        return n
    if drop_tail:
        return n // world
    if pad:
        return -(-n // world)
    return len(range(r, n, world))


# ---------------------------------------------------------------------------------------------
# Metrics: sums over every process
# ---------------------------------------------------------------------------------------------

def all_reduce_sum(values: Iterable[float | torch.Tensor], device: torch.device | str | None = None) -> list[float]:
    """The sums over every process of a few numbers (float64, one collective); the numbers themselves with one process."""
    values = list(values)
    if world_size() == 1:
        return [float(v) for v in values]
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flat = torch.stack([torch.as_tensor(v).detach().to(device=device, dtype=torch.float64).reshape(())
                        for v in values])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return flat.tolist()


def gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every process (pickled); [obj] with one process."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------
# Normalisation across devices
# ---------------------------------------------------------------------------------------------

class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes, differentiable: the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, tensor):
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are the mean and variance over the whole global batch.

    Each process sums its activations per channel; the sums are all-reduced (in the forward pass
    and, for their gradients, in the backward pass), so every process normalises with the same
    statistics that one process would compute on all the processes' batches together. Works with
    gloo on CPUs as with nccl on GPUs. In one process it is an ordinary BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        dims = (0, 2, 3)
        dtype = x.dtype  # under autocast x may be bf16 or fp16: the statistics are taken in float32, as BatchNorm does
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        count = _AllReduceSum.apply(torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device))
        mean = _AllReduceSum.apply(x.sum(dims)) / count
        centred = x - mean.view(1, -1, 1, 1)
        var = _AllReduceSum.apply(centred.pow(2).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(unbiased.detach(), m)
        out = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out.to(dtype)


class PerDeviceBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d as `devices` processes compute it on a batch split between them, simulated in one process.

    Device r holds samples r, r + devices, r + 2 * devices, ... of the batch (the strided shards
    of `shard`). In training each device's samples are normalised with their own statistics, as
    every process of a DDP job does with plain BatchNorm; the running statistics follow device 0,
    as DDP keeps rank 0's buffers. With the loss averaged over the whole batch, the gradients
    equal DDP's averaged gradients. In evaluation it is an ordinary BatchNorm2d.
    """

    def __init__(self, num_features: int, devices: int = 1, **kwargs):
        super().__init__(num_features, **kwargs)
        if devices < 1:
            raise ValueError(f"devices must be at least 1, got {devices}")
        self.devices = devices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.devices == 1:
            return super().forward(x)
        n, dtype = x.shape[0], x.dtype  # statistics in float32 under autocast too, as BatchNorm takes them
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        devices = self.devices
        if n % devices:
            from . import runtime  # (runtime imports this module)
            if runtime.dry_batch_samples():  # an fp16 dry run on a CPU cut the batch: the same code path
                devices = math.gcd(n, devices)
        if n % devices:
            raise ValueError(f"a batch of {n} cannot be split evenly over {devices} devices: choose a batch "
                             f"size that is a multiple of {devices}")
        parts = x.reshape(n // devices, devices, *x.shape[1:])  # parts[:, r] is device r's share
        dims = (0, 3, 4)
        mean = parts.mean(dims, keepdim=True)
        var = parts.var(dims, unbiased=False, keepdim=True)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                count = n // devices * x.shape[2] * x.shape[3]
                self.running_mean.lerp_(mean[0, 0].flatten(), m)
                self.running_var.lerp_(var[0, 0].flatten() * count / max(count - 1, 1), m)
        out = ((parts - mean) * torch.rsqrt(var + self.eps)).reshape_as(x)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out.to(dtype)


def convert_batchnorm(model: nn.Module, make: Callable[[nn.BatchNorm2d], nn.Module]) -> nn.Module:
    """Replace every BatchNorm2d of `model` (in place) by `make(old)`, keeping its weights and buffers."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d) and type(child) in (nn.BatchNorm2d, SyncBatchNorm2d, PerDeviceBatchNorm2d):
            new = make(child)
            like = next(iter(child.state_dict().values()), None)  # keep the old layer's device and dtype
            if like is not None:
                new.to(device=like.device, dtype=child.weight.dtype if child.affine else child.running_mean.dtype)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            convert_batchnorm(child, make)
    return model


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm2d of `model` becomes a SyncBatchNorm2d (same weights); call it before `wrap`."""
    def make(bn):
        return SyncBatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    return convert_batchnorm(model, make)


def convert_per_device_batchnorm(model: nn.Module, devices: int) -> nn.Module:
    """Every BatchNorm2d of `model` becomes a PerDeviceBatchNorm2d over `devices` slices (same weights)."""
    def make(bn):
        return PerDeviceBatchNorm2d(bn.num_features, devices, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                                    track_running_stats=bn.track_running_stats)
    return convert_batchnorm(model, make)


# ---------------------------------------------------------------------------------------------
# Running processes: forked on this machine (tests, exercises), or torchrun (scripts)
# ---------------------------------------------------------------------------------------------

class ProcessFailed(RuntimeError):
    """A process of `launch_local` raised, or did not finish in time."""


def _child(fn, rank_, world, store_dir, timeout_s, args, conn) -> None:
    try:
        torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
        if sys.platform.startswith("linux"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: connect over the loopback
        os.environ.update(RANK=str(rank_), LOCAL_RANK=str(rank_), WORLD_SIZE=str(world))
        dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank_, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            result = ("ok", fn(rank_, world, *args))
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # report every failure to the parent, which raises it
        try:
            pickle.dumps(exc)
            payload = exc
        except Exception:
            payload = RuntimeError(f"{type(exc).__name__}: {exc}")
        result = ("error", (payload, traceback.format_exc()))
    conn.send_bytes(pickle.dumps(result))
    conn.close()


def launch_local(fn: Callable, world: int = 2, args: tuple = (), timeout_s: float = 60.0) -> list:
    """Run `fn(rank, world, *args)` in `world` forked processes joined by gloo on this machine; return their results.

    For tests and exercises on the CPU: the processes are forked, so `fn` may be defined in a
    notebook. A collective that waits longer than `timeout_s` (one process calling all_reduce
    and the others not) fails. An exception in a process is raised here, with its traceback.
    Forking needs Linux (or macOS), and a parent that has not used CUDA.
    """
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    store_dir = tempfile.mkdtemp(prefix="fasttrain-local-")
    procs, pipes = [], []
    try:
        for r in range(world):
            receive, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, args=(fn, r, world, store_dir, timeout_s, args, send), daemon=True)
            p.start()
            send.close()
            procs.append(p)
            pipes.append(receive)
        results = []
        for r, (p, pipe) in enumerate(zip(procs, pipes)):
            if not pipe.poll(timeout_s + 30):
                raise ProcessFailed(f"process {r} of {world} sent nothing within {timeout_s + 30:.0f} s: a collective "
                                    f"that only some processes call waits forever (call it on every process)")
            try:
                status, value = pickle.loads(pipe.recv_bytes())
            except EOFError:
                p.join(5)
                raise ProcessFailed(f"process {r} of {world} died (exit code {p.exitcode}) before reporting") from None
            if status == "error":
                exc, text = value
                raise exc from ProcessFailed(f"process {r} of {world} raised:\n{text}")
            results.append(value)
        return results
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(store_dir, ignore_errors=True)


def torchrun_command(script: str | os.PathLike, nproc: int, args: Iterable[str] = ()) -> list[str]:
    """The command line that starts `script` in `nproc` processes on this machine with torchrun."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            str(script), *map(str, args)]


def run_torchrun(script: str | os.PathLike, nproc: int, args: Iterable[str] = (), timeout_s: float = 600.0,
                 threads: int | None = None, cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run `script` under torchrun with `nproc` processes and wait; raise with the end of its output if it fails.

    `threads` sets each process's OMP_NUM_THREADS (torchrun's default is 1).
    """
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    try:
        proc = subprocess.run(torchrun_command(script, nproc, args), capture_output=True, text=True, env=env,
                              timeout=timeout_s, cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-3000:] if isinstance(exc.stdout, bytes) else (exc.stdout or "")[-3000:]
        raise ProcessFailed(f"torchrun {Path(script).name} ({nproc} processes) ran over {timeout_s:.0f} s:\n{tail}") \
            from None
    if proc.returncode != 0:
        raise ProcessFailed(f"torchrun {Path(script).name} ({nproc} processes) failed with exit code "
                            f"{proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


# ---------------------------------------------------------------------------------------------
# Dry runs: a torchrun job's cost meters, brought back to the run that launched it
# ---------------------------------------------------------------------------------------------

def export_costs() -> list[dict]:
    """The cost meters of the current dry run in this process, as plain data (empty outside a dry run)."""
    from . import runtime

    run = runtime.current_run()
    return [m.as_dict() for m in run.meters] if run is not None and run.dry_run else []


def import_costs(entries: Iterable[dict], label: str = "") -> int:
    """Add cost meters exported by another process (one rank of a torchrun job) to the current dry run.

    One rank's meters count its own share of the steps, which is the job's wall time when the
    processes run side by side on as many GPUs. Returns how many meters were added.
    """
    from . import runtime

    run = runtime.current_run()
    if run is None or not run.dry_run:
        return 0
    added = 0
    for e in entries:
        m = runtime.CostMeter(e["kind"], f"{e['name']}{label}", e["planned_steps"], e["planned_samples"],
                              e["flops_per_step"], e["ops_per_step"], e["batch"], e["low_precision"])
        run.meters.append(m)
        added += 1
    return added


@contextlib.contextmanager
def process_group_for_tests(backend: str = "gloo") -> Iterable[None]:
    """A one-process gloo group for the block (rank 0 of 1): code that needs a group runs unchanged."""
    if is_distributed():
        yield
        return
    store_dir = tempfile.mkdtemp(prefix="fasttrain-pg-")
    dist.init_process_group(backend, init_method=f"file://{store_dir}/store", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        shutil.rmtree(store_dir, ignore_errors=True)
