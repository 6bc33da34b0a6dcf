"""What a network costs, layer by layer: parameters, receptive field, multiply-accumulates, activation memory.

`param_counts` reads the parameters each layer owns; `receptive_field` walks a stack of
conv and pool layers; `layer_costs` runs one forward pass with forward hooks and records,
for every layer, its output shape, its multiply-accumulates (MACs) and the memory of its
output. MACs are counted for convolutions and linear layers only, the same operations that
`torch.utils.flop_counter.FlopCounterMode` counts (as 2 FLOPs per MAC, biases left out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

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
    handles = []

    def hook(name):
        def record(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                return
            row = rows.get(name)
            macs, nbytes = layer_macs(module, output), output.numel() * output.element_size()
            if row is None:  # first call; a layer called twice adds up
                rows[name] = LayerCost(name, type(module).__name__, tuple(output.shape), 0, macs, nbytes)
            else:
                row.macs += macs
                row.activation_bytes += nbytes
        return record

    for name, m in _leaf_modules(model):
        handles.append(m.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    counts = param_counts(model)
    for name, row in rows.items():
        row.params = counts.get(name, 0)
    return list(rows.values())


def total_macs(model: nn.Module, x: torch.Tensor) -> int:
    """All multiply-accumulates of conv and linear layers in `model(x)`."""
    return sum(r.macs for r in layer_costs(model, x))


def format_costs(rows: Sequence[LayerCost]) -> str:
    """A text table of layer costs (params, MMACs, activation KiB), with a total line."""
    lines = [f"{'layer':<22}{'kind':<18}{'output':<18}{'params':>10}{'MMACs':>10}{'act KiB':>10}"]
    for r in rows:
        shape = "x".join(map(str, r.out_shape[1:]))
        lines.append(f"{r.name:<22}{r.kind:<18}{shape:<18}{r.params:>10,}{r.macs / 1e6:>10.2f}"
                     f"{r.activation_bytes / 1024:>10.1f}")
    lines.append(f"{'total':<58}{sum(r.params for r in rows):>10,}{sum(r.macs for r in rows) / 1e6:>10.2f}"
                 f"{sum(r.activation_bytes for r in rows) / 1024:>10.1f}")
    return "\n".join(lines)


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
