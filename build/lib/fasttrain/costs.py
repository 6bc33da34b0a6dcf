"""What a network costs, layer by layer: parameters, receptive field, multiply-accumulates, activation memory.

`param_counts` reads the parameters each layer owns; `receptive_field` walks a stack of
conv and pool layers; `layer_costs` runs one forward pass with forward hooks and records,
for every layer, its output shape, its multiply-accumulates (MACs) and the memory of its
output. MACs are counted for convolutions and linear layers only, the same operations that
`torch.utils.flop_counter.FlopCounterMode` counts (as 2 FLOPs per MAC, biases left out).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from .hooks import forward_hooks
from .tables import format_table
from .train import eval_mode

# Layers that keep the spatial geometry: they do not change a receptive field.
_POINTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Sigmoid, nn.Tanh,
              nn.Identity, nn.Dropout, nn.Dropout2d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm,
              nn.InstanceNorm2d, nn.LazyBatchNorm2d)


def _leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules that have no children (for a Sequential, in the order they run)."""
    return [(name, m) for name, m in model.named_modules() if not any(True for _ in m.children())]


def _check_materialized(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"Parameter {name!r} is not materialized yet (a Lazy layer that has not seen an input). "
                "Run one forward pass first, e.g. `model(torch.zeros(1, 3, 32, 32))`, or build the model "
                "with fasttrain.vgg.vgg_net, which does it for you.")


def param_counts(model: nn.Module) -> dict[str, int]:
    """Number of parameters each layer owns (weights and biases), by layer name; layers without any are left out."""
    _check_materialized(model)
    counts = {}
    for name, m in model.named_modules():
        n = sum(p.numel() for p in m.parameters(recurse=False))
        if n:
            counts[name] = n
    return counts


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass(frozen=True)
class FieldStep:
    """The receptive field after one layer: its side in input pixels, and the jump (input pixels per output step)."""

    name: str
    kernel: int
    stride: int
    dilation: int
    field: int
    jump: int


def _geometry(m) -> tuple[int, int, int] | None:
    """(kernel, stride, dilation) along one axis of a conv or pool layer; None for a pointwise layer."""
    if isinstance(m, (tuple, list)):
        if len(m) not in (2, 3):
            raise ValueError(f"A layer given as a tuple must be (kernel, stride) or (kernel, stride, dilation), got {m!r}")
        k, s, d = (*m, 1) if len(m) == 2 else m
        return int(k), int(s), int(d)
    if isinstance(m, (nn.Conv2d, nn.LazyConv2d)):
        k, s, d = _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation)
    elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        k, s = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size)
        d = _pair(getattr(m, "dilation", 1))
    elif isinstance(m, _POINTWISE):
        return None
    else:
        raise TypeError(
            f"receptive_field does not know how {type(m).__name__} changes the geometry. Pass only the "
            "convolutional part of a network (e.g. `net.features`), or the layers as (kernel, stride) tuples.")
    if len({k[0], k[1]}) > 1 or len({s[0], s[1]}) > 1 or len({d[0], d[1]}) > 1:
        raise ValueError(f"{type(m).__name__} is not square ({k}, stride {s}); receptive_field handles square layers only")
    return k[0], s[0], d[0]


def receptive_fields(layers: nn.Module | Iterable) -> list[FieldStep]:
    """The receptive field after each conv or pool layer of a stack (a module, or (kernel, stride[, dilation]) tuples)."""
    if isinstance(layers, nn.Module):
        named = _leaf_modules(layers)
    else:
        named = [(str(i), m) for i, m in enumerate(layers)]
    field, jump, steps = 1, 1, []
    for name, m in named:
        geometry = _geometry(m)
        if geometry is None:
            continue
        k, s, d = geometry
        field += (k - 1) * d * jump
        jump *= s
        steps.append(FieldStep(name, k, s, d, field, jump))
    return steps


def receptive_field(layers: nn.Module | Iterable) -> int:
    """Side, in input pixels, of the region one output pixel of a conv/pool stack sees."""
    steps = receptive_fields(layers)
    return steps[-1].field if steps else 1


@dataclass
class LayerCost:
    """One layer's cost for the batch it was measured with."""

    name: str
    kind: str
    out_shape: tuple[int, ...]
    params: int
    macs: int
    activation_bytes: int


def layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    """Multiply-accumulates of a conv or linear layer that produced `output` (0 for any other layer)."""
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        w = module.weight
        return output.numel() * (w.numel() // w.shape[0])  # every output value: Cin/groups * kh * kw MACs
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def layer_costs(model: nn.Module, x: torch.Tensor) -> list[LayerCost]:
    """Run `model(x)` once with forward hooks; return each leaf layer's output shape, params, MACs and output bytes.

    The counts are for the batch `x` (pass one image for per-image numbers). The model is put in
    eval mode for the pass (so BatchNorm statistics are left alone) and back afterwards.
    """
    rows: dict[str, LayerCost] = {}
    names = {m: name for name, m in _leaf_modules(model)}

    def record(module, inputs, output):
        if not isinstance(output, torch.Tensor):
            return
        name = names[module]
        macs, nbytes = layer_macs(module, output), output.numel() * output.element_size()
        if name not in rows:  # first call; a layer called twice adds up
            rows[name] = LayerCost(name, type(module).__name__, tuple(output.shape), 0, macs, nbytes)
        else:
            rows[name].macs += macs
            rows[name].activation_bytes += nbytes

    with forward_hooks(names, record), eval_mode(model), torch.no_grad():
        model(x)
    counts = param_counts(model)
    for name, row in rows.items():
        row.params = counts.get(name, 0)
    return list(rows.values())


def total_macs(model: nn.Module, x: torch.Tensor) -> int:
    """All multiply-accumulates of conv and linear layers in `model(x)`."""
    return sum(r.macs for r in layer_costs(model, x))


def format_costs(rows: Sequence[LayerCost]) -> str:
    """A text table of layer costs (params, MMACs, activation KiB), with a total line."""
    table = [{"layer": r.name, "kind": r.kind, "output": "x".join(map(str, r.out_shape[1:])), "params": r.params,
              "mmacs": r.macs / 1e6, "kib": r.activation_bytes / 1024} for r in rows]
    table.append({"layer": "total", "kind": "", "output": "", "params": sum(r.params for r in rows),
                  "mmacs": sum(r.macs for r in rows) / 1e6, "kib": sum(r.activation_bytes for r in rows) / 1024})
    return format_table(table, {"layer": "layer", "kind": "kind", "output": "output", "params": "params",
                                "mmacs": "MMACs", "kib": "act KiB"},
                        {"params": ",d", "mmacs": ".2f", "kib": ".1f"}, markdown=False)


def count_parameters(model: nn.Module) -> int:
    """All parameters of a model (trainable or not)."""
    return sum(param_counts(model).values())


def plot_layer_costs(rows: Sequence[LayerCost], title: str = ""):
    """Bar charts of MACs, parameters and activation memory per conv/linear layer; returns the figure."""
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.macs > 0]
    names = [f"{r.name}\n{'x'.join(map(str, r.out_shape[1:]))}" for r in shown]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for ax, values, label in zip(axes, ([r.macs / 1e6 for r in shown], [r.params / 1e3 for r in shown],
                                        [r.activation_bytes / 1024 for r in shown]),
                                 ("multiply-accumulates (millions)", "parameters (thousands)", "output memory (KiB)")):
        ax.bar(range(len(shown)), values, color="tab:blue")
        ax.set_xticks(range(len(shown)), names, rotation=90, fontsize=7)
        ax.set_title(label)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# What a whole profile costs: FLOPs counted in a dry run, and seconds on named GPUs
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Accelerator:
    """A GPU for the estimate: dense tensor-core peak in fp16/bf16, fp32 peak, host time per operator launch."""

    name: str
    low_precision_tflops: float
    fp32_tflops: float
    launch_us: float


# Peaks from the vendors' data sheets (dense, no sparsity). A T4 has no native bf16: the library
# trains in fp16 with a GradScaler there. `launch_us` is the host's time per operator in eager
# PyTorch (dispatcher plus kernel launch), which bounds the speed of small models.
ACCELERATORS = {
    "T4": Accelerator("NVIDIA T4", 65.0, 8.1, 12.0),
    "A100": Accelerator("NVIDIA A100 SXM", 312.0, 19.5, 6.0),
    "H100": Accelerator("NVIDIA H100 SXM", 989.0, 67.0, 5.0),
}
UTILISATION = 0.35       # share of the peak that convolutions and matmuls reach in training
CPU_GFLOPS = 100.0       # a 2-core CPU training convnets in fp32 (measured here: 100 to 130 GFLOP/s)
ESTIMATES_JSON = Path(__file__).with_name("estimates.json")


def _steps_at_profile_batch(entry: dict, overrides: dict) -> float:
    """Planned steps at the profile's own batch size, undoing a dry run's smaller batch."""
    steps = entry["planned_steps"]
    for change in overrides.values():
        dry, full = change.get("dry_value"), change.get("profile_value")
        if isinstance(dry, int) and isinstance(full, int) and entry["batch"] == dry and full > dry:
            return steps * dry / full
    return steps


def summarize_meters(meters, overrides: dict | None = None) -> dict:
    """FLOPs and estimated seconds of a profile from the cost meters of its dry run."""
    overrides = overrides or {}
    entries, totals = [], {"train": 0.0, "eval": 0.0, "other": 0.0}
    seconds = {name: 0.0 for name in ACCELERATORS}
    for m in meters:
        e = m.as_dict()
        if e["flops_per_step"] is None or e["planned_steps"] == 0:
            continue
        per_sample = e["flops_per_step"] / e["batch"] if e["batch"] else None
        if per_sample is not None and e["planned_samples"]:
            flops = per_sample * e["planned_samples"]
        else:
            flops = e["flops_per_step"] * e["planned_steps"]
        steps = _steps_at_profile_batch(e, overrides)
        e.update(total_flops=flops, steps_at_profile_batch=steps)
        entries.append(e)
        totals[e["kind"]] += flops
        for name, gpu in ACCELERATORS.items():
            peak = gpu.low_precision_tflops if e["low_precision"] else gpu.fp32_tflops
            compute = flops / (peak * 1e12 * UTILISATION)
            launches = steps * (e["ops_per_step"] or 0) * gpu.launch_us * 1e-6
            seconds[name] += max(compute, launches)
    total = sum(totals.values())
    return {"entries": entries, "flops": {**totals, "total": total},
            "seconds": {**seconds, "CPU": total / (CPU_GFLOPS * 1e9)},
            "assumptions": {"utilisation": UTILISATION, "cpu_gflops": CPU_GFLOPS,
                            "accelerators": {k: vars(v) for k, v in ACCELERATORS.items()}}}


def load_estimates(path: Path = ESTIMATES_JSON) -> dict:
    """The committed estimates table: {chapter: {profile: {"flops": ..., "seconds": {...}}}} (empty if missing)."""
    import json

    return json.loads(path.read_text()) if path.is_file() else {}


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe_estimate(chapter: str, profile: str = "full") -> str:
    """One sentence: the profile's FLOPs and its estimated time on each named GPU and on a CPU."""
    entry = load_estimates().get(chapter, {}).get(profile)
    if entry is None:
        return (f"No cost estimate is recorded for {chapter} ({profile}); a dry run measures one: "
                f"`fasttrain run {chapter} --profile {profile} --dry-run`.")
    s = entry["seconds"]
    gpus = ", ".join(f"{_duration(s[name])} on an {name}" if name[0] in "AH" else f"{_duration(s[name])} on a {name}"
                     for name in ACCELERATORS)
    return (f"Estimated cost of the {profile} profile: {entry['flops']['total'] / 1e15:.3g} PFLOP, about {gpus} "
            f"(at {UTILISATION:.0%} of peak), and about {_duration(s['CPU'])} on a CPU at {CPU_GFLOPS:.0f} GFLOP/s.")
