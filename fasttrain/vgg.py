"""VGG-style networks, and the tools of chapter 3's ablation: a rate per setting, several seeds, mean and spread.

A block keeps the resolution through its convolutions (3x3, padding 1) and halves it in the
pool; the next block doubles the width. The layers are Lazy (`LazyConv2d`, `LazyLinear`): they
learn their input size from the first batch, so a block needs only its output width.
`vgg_net` runs that first batch for you, so the model it returns can go straight to an optimizer.

An ablation compares settings fairly: `tune_and_repeat` gives each setting its own learning rate
(a small sweep scored on held-out images) and then trains more seeds at that rate; `summarize`,
`compare`, `format_summaries` and `plot_summaries` give the mean and spread over the seeds.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from . import runtime
from .step import NonFiniteLossError
from .train import eval_mode

# (number of 3x3 convolutions, output channels) per block.
VGG_SMALL = ((1, 16), (1, 32), (1, 64))  # the smoke profile's net: quick on a CPU
VGG_QUARTER = ((1, 16), (1, 32), (1, 64), (1, 128))  # VGG_CIFAR's four blocks at a quarter of the width, one conv each
VGG_CIFAR = ((2, 64), (2, 128), (2, 256), (2, 512))


def vgg_block(num_convs: int, out_channels: int, batch_norm: bool = True, pool: bool = True) -> nn.Sequential:
    """`num_convs` x (3x3 conv, BatchNorm, ReLU) at one width, then a 2x2 max pool that halves the resolution."""
    if num_convs < 1 or out_channels < 1:
        raise ValueError(f"A VGG block needs at least one convolution and one channel, got "
                         f"num_convs={num_convs}, out_channels={out_channels}")
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        # With BatchNorm right after, a conv bias would be cancelled by the mean subtraction: leave it out.
        layers.append(nn.LazyConv2d(out_channels, kernel_size=3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
    if pool:
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class VGGNet(nn.Module):
    """VGG blocks (`features`), then a head (`head`): global average pool or flatten, dropout, one linear layer."""

    def __init__(self, arch: Sequence[tuple[int, int]] = VGG_CIFAR, num_classes: int = 10, head: str = "gap",
                 dropout: float = 0.0, batch_norm: bool = True):
        """`batch_norm=False` gives every convolution a bias instead of a BatchNorm after it."""
        super().__init__()
        if head not in ("gap", "flatten"):
            raise ValueError(f"head must be 'gap' (global average pooling) or 'flatten', got {head!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout is a probability in [0, 1), got {dropout}")
        if not arch:
            raise ValueError("arch needs at least one (num_convs, out_channels) block")
        self.arch, self.head_kind = tuple(tuple(b) for b in arch), head
        self.features = nn.Sequential(*(vgg_block(n, c, batch_norm) for n, c in arch))
        pool = [nn.AdaptiveAvgPool2d(1)] if head == "gap" else []
        self.head = nn.Sequential(*pool, nn.Flatten(), nn.Dropout(dropout), nn.LazyLinear(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def materialize(model: nn.Module, input_shape: Sequence[int] = (3, 32, 32)) -> nn.Module:
    """Give a model's Lazy layers their sizes with one forward pass on a zero batch (in eval mode); returns the model."""
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    with eval_mode(model), torch.no_grad():
        model(torch.zeros(2, *input_shape, device=device))
    return model


def vgg_net(arch: Sequence[tuple[int, int]] = VGG_CIFAR, num_classes: int = 10, head: str = "gap",
            dropout: float = 0.0, batch_norm: bool = True, input_shape: Sequence[int] = (3, 32, 32),
            device: torch.device | str = "cpu") -> VGGNet:
    """A materialized VGGNet on `device`, ready for an optimizer."""
    return materialize(VGGNet(arch, num_classes, head, dropout, batch_norm), input_shape).to(device)


def mean_confidence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean probability the model gives to the class it predicts (labels unused): pass it to `evaluate` as `loss_fn`."""
    return logits.float().softmax(dim=1).max(dim=1).values.mean()


# ---------------------------------------------------------------------------------------------
# Comparing settings: a tuned rate each, several seeds, mean and spread
# ---------------------------------------------------------------------------------------------

class RunStore:
    """Results of finished trainings by key, kept in a JSON file when given `path` (so an interrupted sweep resumes)."""

    def __init__(self, path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        self.results: dict[str, dict] = {}
        if self.path is not None and self.path.is_file():
            self.results = json.loads(self.path.read_text())

    def get(self, key: str) -> dict | None:
        return self.results.get(key)

    def put(self, key: str, result: dict) -> None:
        self.results[key] = result
        if self.path is not None:
            from .results import write_json_atomically

            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomically(self.path, self.results)


def run_key(name: str, lr: float, seed: int) -> str:
    """The key under which `tune_and_repeat` keeps the training of setting `name` at rate `lr` with `seed`."""
    return f"{name}|lr={lr:.6g}|seed={seed}"


def tune_and_repeat(train: Callable[[float, int], dict], rates: Sequence[float], seeds: Sequence[int],
                    score: str = "val_acc", name: str = "", store: RunStore | None = None,
                    report: Callable[[str, dict], None] | None = None, extend: int = 0) -> dict:
    """Train at every rate with the first seed, keep the rate with the best `score`, then train the other seeds at it.

    With `extend`, a best rate at either end of the grid (and not next to a diverged one) makes the sweep go one
    step further that way (the grid's own ratio), up to `extend` extra rates, so that the chosen rate ends inside
    the grid where the budget allows.

    `train(lr, seed)` returns a dict of numbers (higher `score` is better; score it on held-out
    training images, never on the test set). A rate whose loss becomes inf or NaN loses the sweep.
    Returns {"rates": {lr: score}, "lr": the chosen rate, "at_edge": whether it is the smallest or
    largest of the rates that did not diverge, "runs": one result per seed at that rate}. In a dry run only the first
    training runs (its result stands for every seed), and its cost counts for all of them.
    """
    if not rates or not seeds:
        raise ValueError("tune_and_repeat needs at least one rate and one seed")
    store = store if store is not None else RunStore()

    def one(lr: float, seed: int) -> dict:
        key = run_key(name, lr, seed)
        result = store.get(key)
        if result is None:
            try:
                result = dict(train(lr, seed))
            except NonFiniteLossError as error:
                result = {"diverged": True, "error": str(error).split(";")[0]}
            result.update(lr=lr, seed=seed)
            store.put(key, result)
        if report is not None:
            report(key, result)
        return result

    if runtime.is_dry_run():
        # A dry run trains the first rate with the first seed only; the cost of that one training is counted
        # once for every training the sweep plans (its rates with the first seed, then the other seeds).
        meters = runtime.current_run().meters
        first_meter = len(meters)
        result = one(rates[0], seeds[0])
        planned = len(rates) + extend + len(seeds) - 1  # counts the extensions the sweep may need
        for m in meters[first_meter:]:
            m.planned_steps *= planned
            m.planned_samples = None if m.planned_samples is None else m.planned_samples * planned
        return {"rates": {lr: result.get(score) for lr in rates[:1]}, "lr": rates[0], "at_edge": False,
                "runs": [{**result, "seed": s} for s in seeds]}
    rates = sorted(rates)
    first = {lr: one(lr, seeds[0]) for lr in rates}
    scores = {lr: (-math.inf if r.get("diverged") else float(r[score])) for lr, r in first.items()}
    best = max(rates, key=lambda lr: scores[lr])
    for _ in range(extend if len(rates) > 1 else 0):
        if best == rates[-1] and scores[best] > -math.inf:
            new_lr = rates[-1] * rates[-1] / rates[-2]
        elif best == rates[0] and scores[best] > -math.inf:
            new_lr = rates[0] * rates[0] / rates[1]
        else:
            break
        new_lr = float(f"{new_lr:.6g}")
        first[new_lr] = one(new_lr, seeds[0])
        scores[new_lr] = -math.inf if first[new_lr].get("diverged") else float(first[new_lr][score])
        rates = sorted(rates + [new_lr])
        best = max(rates, key=lambda lr: scores[lr])
    if scores[best] == -math.inf:
        raise NonFiniteLossError(f"{name or 'this setting'}: the loss became inf or NaN at every rate tried "
                                 f"({', '.join(f'{lr:g}' for lr in rates)}); try smaller rates")
    runs = [first[best]] + [one(best, s) for s in seeds[1:]]
    finite = [lr for lr in rates if scores[lr] > -math.inf]  # next to a diverged rate is the edge of what trains
    return {"rates": {lr: (None if scores[lr] == -math.inf else scores[lr]) for lr in rates}, "lr": best,
            "at_edge": len(rates) > 1 and best in (min(finite), max(finite)), "runs": runs}


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for fewer than two values)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_spread needs at least one value")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def summarize(runs: Sequence[dict], keys: Sequence[str]) -> dict[str, dict]:
    """{key: {"mean", "sd", "n", "values"}} over the runs (one per seed)."""
    out = {}
    for key in keys:
        values = [float(r[key]) for r in runs]
        mean, sd = mean_spread(values)
        out[key] = {"mean": mean, "sd": sd, "n": len(values), "values": values}
    return out


def compare(base: dict, other: dict, noise: float = 2.0) -> dict:
    """`other` minus `base` (two summaries of one metric), its standard error, and whether it is clear of the noise.

    `clear` is True when the difference exceeds `noise` standard errors, False when it does not,
    and None when either side has fewer than two seeds (no spread to judge it by).
    """
    diff = other["mean"] - base["mean"]
    if base["n"] < 2 or other["n"] < 2:
        return {"diff": diff, "se": math.nan, "clear": None}
    se = math.sqrt(base["sd"] ** 2 / base["n"] + other["sd"] ** 2 / other["n"])
    return {"diff": diff, "se": se, "clear": abs(diff) > noise * se}


def format_mean_spread(summary: dict, fmt: str = ".3f") -> str:
    """'0.612 ± 0.008' (the mean alone for a single seed)."""
    if summary["n"] < 2:
        return format(summary["mean"], fmt)
    return f"{summary['mean']:{fmt}} ± {summary['sd']:{fmt}}"


def format_summaries(summaries: dict[str, dict], columns: dict[str, str], fmt: str = ".3f",
                     extra: dict[str, dict[str, str]] | None = None) -> str:
    """A markdown table: one row per setting, each column 'mean ± sd' of one metric.

    `extra` adds text columns before the metrics: {column title: {setting: text}}.
    """
    extra = extra or {}
    header = "| setting | " + " | ".join([*extra, *columns.values()]) + " |"
    rule = "| --- |" + " ---: |" * (len(extra) + len(columns))
    rows = [f"| {name} | " + " | ".join([*(extra[title].get(name, "") for title in extra),
                                          *(format_mean_spread(s[key], fmt) for key in columns)]) + " |"
            for name, s in summaries.items()]
    return "\n".join([header, rule, *rows])


def plot_summaries(summaries: dict[str, dict], columns: dict[str, str], title: str = ""):
    """One panel per metric: a bar per setting at the mean, error bars of one standard deviation, a dot per seed."""
    import matplotlib.pyplot as plt

    names = list(summaries)
    fig, axes = plt.subplots(1, len(columns), figsize=(3.6 * len(columns) + 1.5, 0.45 * len(names) + 1.4),
                             sharey=True, squeeze=False)
    for ax, (key, label) in zip(axes[0], columns.items()):
        means = [summaries[n][key]["mean"] for n in names]
        sds = [0.0 if math.isnan(summaries[n][key]["sd"]) else summaries[n][key]["sd"] for n in names]
        ax.barh(range(len(names)), means, xerr=sds, color="tab:blue", alpha=0.55, capsize=3)
        for y, n in enumerate(names):
            values = summaries[n][key]["values"]
            ax.plot(values, [y] * len(values), "k.", markersize=4)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(names)), names)
    axes[0][0].invert_yaxis()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
