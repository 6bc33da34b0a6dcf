"""A chapter's run: one call to start it, one call to finish it, and every setting in between recorded.

`start` resolves the profile, the device, the seed, the CPU threads, whether nbgrader is
grading, and the data root, and returns a `Run`. The chapter then picks each setting that
depends on the profile through `run.setting(...)`, reports what it measured with
`run.metric(...)`, `run.glue(...)` and `run.say(...)`, and ends with `run.finish()`, which
checks the targets and writes the results record (every setting included, as nanoGPT saves
its config with a checkpoint).

Profiles: `smoke` (CPU, small, what CI runs), `cpu` (CPU, about 15 minutes a chapter, sized
so that the experiments show their effect), `full` (GPU, the real targets). `auto` is full on
CUDA and smoke elsewhere. A full profile on a CPU is refused with its cost estimate unless
`allow_cpu_full=True`.

A **dry run** (`dry_run=True`, or `"bf16"` / `"fp16"` to choose the autocast dtype) executes a
profile's every code path with the same models, data and schedules, but every loop of the
library stops after `DRY_STEPS` steps. It forces autocast on the CPU, so that both the bf16
path and the fp16-with-GradScaler path run without a GPU, and it counts the FLOPs and operator
launches of one step of every loop, which give the profile's cost estimate
(`fasttrain.costs.estimate`). Its record is marked as a dry run and never counts as a result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from . import distributed, results
from .datasets import cache_dir
from .device import default_threads, device_name, force_autocast_dtype, get_device, seed_everything  # noqa: F401

PROFILES = ("smoke", "cpu", "full")
PROFILE_HELP = {
    "smoke": "small and quick on a CPU: proves that the code runs (what CI executes)",
    "cpu": "about 15 minutes a chapter on a 2-core CPU, sized so that the experiments show their effect",
    "full": "the real targets, on a GPU",
}
DRY_STEPS = 2          # steps of every loop in a dry run
DRY_EPOCHS = 2         # epochs of every Learner.fit in a dry run (each cut to DRY_STEPS batches)
DRY_RUN_DTYPES = {True: torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16}
# CPUs have no fast float16 kernels (a convolution runs about 50 times slower than in float32), so an fp16 dry run
# on the CPU also cuts every batch of the library's loaders to this many samples. Its record says so, and its
# costs are not the estimate: the bf16 dry run, on whole batches, gives that. A step's time grows with the samples
# (full-width ResNet-9 in fp16 on one CPU thread: 40 s a step at 8 samples, 10 s at 2), and 2 samples still give
# BatchNorm a batch statistic.
DRY_FP16_CPU_SAMPLES = 2
GRADING_ENV = "NBGRADER_EXECUTION"
SOURCE_HASH_ENV = "FASTTRAIN_SOURCE_HASH"
RECORD_OUT_ENV = "FASTTRAIN_RECORD_OUT"

_current: "Run | None" = None


class RunRecord(dict):
    """The record `Run.finish` returns: a dict, which a notebook shows as one line, since the table that `finish`
    printed above it is the readable view (the whole record, range-test curves and all, ran to pages)."""

    def _repr_pretty_(self, printer, cycle) -> None:
        metrics = self.get("metrics", [])
        judged = [m for m in metrics if m.get("target") is not None]
        printer.text(f"<results record of {self.get('chapter')} ({self.get('profile')}): {self.get('status')}, "
                     f"{sum(bool(m.get('passed')) for m in judged)} of {len(judged)} targets reached, "
                     f"{len(metrics)} metrics; a dict>")


class ProfileRefused(RuntimeError):
    """A full profile was asked for on a CPU, where it would run for hours."""


def resolve_profile(profile: str, device: torch.device | str | None = None) -> str:
    """Map "auto" to "full" on CUDA and "smoke" elsewhere; reject unknown names with a clear error."""
    if profile == "auto":
        cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        return "full" if cuda else "smoke"
    if profile not in PROFILES:
        choices = "; ".join(f"'{p}' ({PROFILE_HELP[p]})" for p in PROFILES)
        raise ValueError(f"Unknown profile {profile!r}: use {choices}, or 'auto' (full on CUDA, smoke elsewhere).")
    return profile


def current_run() -> "Run | None":
    """The run that `start` began last in this process (None outside a chapter)."""
    return _current


def is_dry_run() -> bool:
    """True while a dry run is active: every loop of the library then stops after DRY_STEPS steps."""
    return _current is not None and bool(_current.dry_run)


def dry_batch_samples() -> int | None:
    """The samples per batch that the library's loaders keep in this dry run (None: whole batches)."""
    return _current.dry_samples_per_batch if _current is not None else None


def cut_batch(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch, or its first `dry_batch_samples()` samples in an fp16 dry run on a CPU."""
    keep = dry_batch_samples()
    if keep is None or len(xb) <= keep:
        return xb, yb
    return xb[:keep], yb[:keep]


def cut(planned: int, steps: int = DRY_STEPS) -> int:
    """`planned` steps normally; at most `steps` of them in a dry run."""
    return min(planned, steps) if is_dry_run() else planned


def each(items: list, steps: int = DRY_STEPS) -> Iterator:
    """Every item; in a dry run only the first `steps`, and the loops they ran count for all items in the estimate.

    For a loop of whole trainings (seeds, rates of a sweep): the cost meters created while the
    kept items ran have their planned steps and samples scaled by len(items) / steps.
    """
    items = list(items)
    if not is_dry_run() or len(items) <= steps:
        yield from items
        return
    first = len(_current.meters)
    yield from items[:steps]
    scale = len(items) / steps
    for m in _current.meters[first:]:
        m.planned_steps = round(m.planned_steps * scale)
        if m.planned_samples is not None:
            m.planned_samples = round(m.planned_samples * scale)


# ---------------------------------------------------------------------------------------------
# Counting what a loop costs (dry runs only)
# ---------------------------------------------------------------------------------------------

class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operators dispatched (about one kernel launch each on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


@dataclass
class CostMeter:
    """FLOPs and operator launches of one step of a loop (the first step it sees), and the steps planned.

    `plan(steps, samples)` adds what the profile would run: `steps` at the profile's own batch
    size and `samples` images in all (when not given: steps times the measured batch).
    """

    kind: str                       # "train" (forward, backward, update), "eval" (forward) or "other"
    name: str
    planned_steps: int = 0
    planned_samples: int | None = 0
    flops: float | None = None
    ops: int | None = None
    batch: int | None = None
    low_precision: bool = False

    def plan(self, steps: int, samples: int | None = None) -> None:
        """Add `steps` planned steps (and `samples` planned images, if known) to the estimate."""
        self.planned_steps += int(steps)
        if samples is None or self.planned_samples is None:
            self.planned_samples = None
        else:
            self.planned_samples += int(samples)

    @contextlib.contextmanager
    def measure(self, batch: int | None = None, low_precision: bool = False) -> Iterator[None]:
        """Count the FLOPs and operators of the block, the first time only."""
        if self.flops is not None:
            yield
            return
        from torch.utils.flop_counter import FlopCounterMode

        flop_counter, op_counter = FlopCounterMode(display=False), _OpCounter()
        with flop_counter, op_counter:
            yield
        self.flops, self.ops = float(flop_counter.get_total_flops()), op_counter.ops
        self.batch, self.low_precision = batch, low_precision

    def as_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "planned_steps": self.planned_steps,
                "planned_samples": self.planned_samples, "flops_per_step": self.flops, "ops_per_step": self.ops,
                "batch": self.batch, "low_precision": self.low_precision}


class _NoMeter:
    """What `meter` returns outside a dry run: counts nothing."""

    def plan(self, steps: int, samples: int | None = None) -> None:
        pass

    @contextlib.contextmanager
    def measure(self, batch: int | None = None, low_precision: bool = False) -> Iterator[None]:
        yield


def meter(kind: str, name: str) -> CostMeter | _NoMeter:
    """A cost meter registered with the current dry run (a no-op otherwise)."""
    if not is_dry_run():
        return _NoMeter()
    m = CostMeter(kind, name)
    _current.meters.append(m)
    return m


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One execution of a chapter: where and how it runs, what it chose, and what it measured."""

    chapter: str
    profile: str
    device: torch.device
    seed: int
    threads: int | None
    grading: bool
    data_dir: str | None
    results_dir: Path
    dry_run: str | bool = False
    parameters: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    glued: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    meters: list = field(default_factory=list)
    dry_overrides: dict = field(default_factory=dict)
    dry_samples_per_batch: int | None = None
    started: float = field(default_factory=time.perf_counter)
    record: dict | None = None

    @property
    def dry_steps(self) -> int:
        return DRY_STEPS

    # --- settings ------------------------------------------------------------------------
    def setting(self, name: str, *, smoke: Any, cpu: Any, full: Any, dry: Any = None) -> Any:
        """The value of setting `name` in this run's profile; recorded. `dry` replaces it in a dry run.

        A dry run keeps the profile's models and data and cuts only the steps; `dry` is for the rare
        setting (a batch size) that would make even a few steps too slow on a CPU.
        """
        by_profile = {"smoke": smoke, "cpu": cpu, "full": full}
        value = by_profile[self.profile]
        if self.dry_run and dry is not None:
            self.dry_overrides[name] = {"profile_value": _jsonable(value), "dry_value": _jsonable(dry)}
            value = dry
        if name in self.settings and self.settings[name] != _jsonable(value):
            raise ValueError(f"setting {name!r} was already chosen as {self.settings[name]!r}: give each setting one name")
        self.settings[name] = _jsonable(value)
        return value

    # --- what the run measured ------------------------------------------------------------
    def metric(self, name: str, value: float, fmt: str = "{:.4g}") -> float:
        """Report a measured value that the targets table may check; also glued under its name."""
        value = float(value)
        self.metrics[name] = value
        self.glue(name, value, fmt)
        return value

    def glue(self, name: str, value: Any, fmt: str | None = None) -> str:
        """Store `value` under `name` for the book's `{glue:text}` role and the record; return its text."""
        text = fmt.format(value) if fmt else str(value)
        self.glued[name] = {"value": _jsonable(value), "text": text}
        _display_glue(name, value, text)
        return text

    def say(self, markdown: str) -> None:
        """Show prose generated from this run's numbers (rendered as Markdown in the notebook and the book)."""
        try:
            from IPython import get_ipython
            from IPython.display import Markdown, display
        except ImportError:  # plain Python: print it
            print(markdown)
            return
        if get_ipython() is None:
            print(markdown)
        else:
            display(Markdown(markdown))

    def log(self, name: str, value: Any) -> Any:
        """Keep a detail of the run (a table, a curve) in the record's `extra` section."""
        self.extra[name] = _jsonable(value)
        return value

    # --- loops and checkpoints --------------------------------------------------------------
    def steps(self, n: int, name: str = "loop") -> Iterator[int]:
        """range(n), cut to a few steps in a dry run, whose first step's FLOPs count towards the estimate."""
        m = meter("other", name)
        m.plan(n)
        for i in range(cut(n)):
            if i == 0:
                with m.measure():
                    yield i
            else:
                yield i

    def checkpoint_path(self, name: str) -> Path:
        """Where a long training `name` of this chapter keeps its resumable state (removed by `finish`)."""
        return self.checkpoint_dir / f"{name}.pt"

    @property
    def checkpoint_dir(self) -> Path:
        tag = f"{self.profile}-dry-{self.dry_run}" if self.dry_run else self.profile  # bf16 and fp16 dry runs may run at once
        return cache_dir() / "checkpoints" / self.chapter / tag

    # --- the end ----------------------------------------------------------------------------
    def finish(self) -> "RunRecord | None":
        """Check the targets, write the results record, print the results; raise if a target was missed."""
        global _current
        if self.grading:
            print("Graded run: no results record is written.")
            return None
        record = RunRecord(results.build_record(self))
        self.record = record
        main = distributed.is_main()  # under torch.distributed only rank 0 writes and prints
        if main:
            results.save_record(record, self.results_dir)
        if main and os.environ.get(RECORD_OUT_ENV):  # the course tooling keeps the record with the executed notebook
            results.write_json_atomically(Path(os.environ[RECORD_OUT_ENV]), record)
        if main:
            results.print_record(record)
        if _current is self:  # the run is over: later loops in this process are no longer cut or counted
            force_autocast_dtype(None)
            _current = None
        if main and record["passed"] is not False:
            _remove_tree(self.checkpoint_dir)
        results.check_targets(record)
        return record

    @property
    def wall_seconds(self) -> float:
        return time.perf_counter() - self.started

    def describe(self) -> str:
        """One line for the top of the notebook: profile, device, seed (no paths)."""
        cut = f", batches cut to {self.dry_samples_per_batch} samples" if self.dry_samples_per_batch else ""
        dry = f", dry run ({self.dry_run}{cut})" if self.dry_run else ""
        grading = ", graded by nbgrader: experiments skipped" if self.grading else ""
        return f"{self.chapter}: profile {self.profile}{dry} on {device_name(self.device)}, seed {self.seed}{grading}"


def start(chapter: str, profile: str = "auto", device: str | torch.device = "auto", seed: int = 0,
          data_dir: str | None = None, results_dir: str | os.PathLike = "results", dry_run: bool | str = False,
          threads: int | None = None, allow_cpu_full: bool = False, parameters: dict | None = None) -> Run:
    """Begin a chapter's run: resolve profile, device, seed, CPU threads, grading mode and data root.

    `threads` caps torch's CPU threads (default: $OMP_NUM_THREADS, else every core this process
    may use). `parameters` are the chapter's own knobs, recorded with the run.
    """
    global _current
    if dry_run not in (False, None, True, "bf16", "fp16"):
        raise ValueError(f"dry_run must be False, True (bf16), 'bf16' or 'fp16', got {dry_run!r}")
    dev = get_device(device, verbose=False)
    profile = resolve_profile(profile, dev)
    dry_run = "bf16" if dry_run is True else (dry_run or False)
    if profile == "full" and dev.type == "cpu" and not dry_run and not allow_cpu_full:
        raise ProfileRefused(_refusal(chapter))
    if dev.type == "cpu":
        threads = threads or default_threads()
        torch.set_num_threads(threads)
    else:
        threads = None
    force_autocast_dtype(DRY_RUN_DTYPES[dry_run] if dry_run and dev.type == "cpu" else None)
    seed_everything(seed)
    run = Run(chapter=chapter, profile=profile, device=dev, seed=seed, threads=threads,
              grading=GRADING_ENV in os.environ, data_dir=data_dir, results_dir=Path(results_dir),
              dry_run=dry_run, parameters={k: _jsonable(v) for k, v in (parameters or {}).items()})
    if dry_run == "fp16" and dev.type == "cpu":
        run.dry_samples_per_batch = DRY_FP16_CPU_SAMPLES
    if dry_run and "RANK" not in os.environ:  # not in a torchrun job that the chapter's own run launched
        _remove_tree(run.checkpoint_dir)  # a dry run never resumes: its cost must count every training
    _current = run
    if distributed.is_main():
        print(run.describe())
    return run


def _refusal(chapter: str) -> str:
    from .costs import describe_estimate

    return (f"The full profile of {chapter} is meant for a GPU and would take hours on this CPU.\n"
            f"{describe_estimate(chapter, 'full')}\n"
            f"Run it on a GPU; or run the CPU-sized profile (-p profile cpu, or `fasttrain run --profile cpu`); "
            f"or check every full code path in minutes with a dry run (-p dry_run True, or "
            f"`fasttrain run --profile full --dry-run`). To start the full profile on this CPU anyway, pass "
            f"-p allow_cpu_full True (papermill) or `fasttrain run --profile full --allow-cpu-full`.")


def _display_glue(name: str, value: Any, text: str) -> None:
    """Emit a hidden output that myst-nb's glue reads (the same format `myst_nb.glue(..., display=False)` writes)."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return
    if get_ipython() is None:
        return
    prefix = "application/papermill.record/"
    display({prefix + "text/plain": text}, raw=True,
            metadata={"scrapbook": {"name": name, "mime_prefix": prefix}})


def _jsonable(value: Any) -> Any:
    """`value` as plain JSON data (tuples to lists, tensors and numpy numbers to Python numbers)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "tolist") and getattr(value, "ndim", 0) > 0:  # a numpy array: its numbers, not its repr
        return _jsonable(value.tolist())
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (torch.device, torch.dtype, Path)):
        return str(value)
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def _remove_tree(path: Path) -> None:
    if path.is_dir():
        for child in sorted(path.rglob("*"), reverse=True):
            child.unlink() if child.is_file() else child.rmdir()
        path.rmdir()


def source_hash(code_cells: list[str]) -> str:
    """The hash a record keeps of the code it ran (code cells only: prose edits do not make a run stale)."""
    digest = hashlib.sha256()
    for source in code_cells:
        digest.update(source.strip().encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]
