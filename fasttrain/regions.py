"""The linear regions of a network with 2-D input: one colour per activation pattern, the decision boundary on top."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .hooks import ACTIVATIONS, activation_modules, forward_hooks
from .train import eval_mode


@torch.no_grad()
def activation_patterns(model: nn.Module, points: torch.Tensor,
                        activations: tuple[type[nn.Module], ...] = ACTIVATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """(patterns, outputs): which neurons are on (pre-activation > 0) at each point, shape (N, neurons), and the outputs."""
    parts: list[torch.Tensor] = []

    def on(module, inputs):
        parts.append(inputs[0].reshape(inputs[0].shape[0], -1) > 0)

    with forward_hooks(activation_modules(model, activations), on, pre=True), eval_mode(model):
        outputs = model(points)
    return torch.cat(parts, dim=1), outputs


def region_ids(patterns: torch.Tensor) -> torch.Tensor:
    """One integer per distinct activation pattern (a linear region), for each row of `patterns`."""
    return torch.unique(patterns, dim=0, return_inverse=True)[1]


def _grid(xlim: tuple[float, float], ylim: tuple[float, float], resolution: int) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.linspace(*xlim, resolution), np.linspace(*ylim, resolution))


def _box(x: torch.Tensor | None, xlim: tuple[float, float] | None,
         ylim: tuple[float, float] | None) -> tuple[tuple[float, float], tuple[float, float]]:
    """The window to look at: the data's bounding box padded by 15% unless `xlim` and `ylim` say otherwise."""
    if x is not None:
        xs = x.detach().cpu().numpy()
        pad = 0.15 * (xs.max(0) - xs.min(0))
        xlim = xlim or (float(xs[:, 0].min() - pad[0]), float(xs[:, 0].max() + pad[0]))
        ylim = ylim or (float(xs[:, 1].min() - pad[1]), float(xs[:, 1].max() + pad[1]))
    if xlim is None or ylim is None:
        raise ValueError("plot_regions and count_regions need the data `x` or both `xlim` and `ylim` to know where to look")
    return xlim, ylim


def _grid_regions(model: nn.Module, xlim: tuple[float, float], ylim: tuple[float, float],
                  resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
    """(gx, gy, region id of each grid pixel, outputs) of a 2-D-input model on a resolution x resolution grid."""
    param = next(model.parameters())
    gx, gy = _grid(xlim, ylim, resolution)
    grid = torch.tensor(np.stack([gx.ravel(), gy.ravel()], axis=1), dtype=param.dtype, device=param.device)
    patterns, outputs = activation_patterns(model, grid)
    return gx, gy, region_ids(patterns).cpu().numpy(), outputs


def count_regions(model: nn.Module, x: torch.Tensor | None = None, xlim: tuple[float, float] | None = None,
                  ylim: tuple[float, float] | None = None, resolution: int = 400) -> int:
    """Linear regions of a 2-D-input `model` that a grid sees in the window `plot_regions` would draw."""
    xlim, ylim = _box(x, xlim, ylim)
    return int(_grid_regions(model, xlim, ylim, resolution)[2].max()) + 1


def plot_regions(model: nn.Module, ax=None, x: torch.Tensor | None = None, y: torch.Tensor | None = None,
                 xlim: tuple[float, float] | None = None, ylim: tuple[float, float] | None = None,
                 resolution: int = 400, seed: int = 0, title: str | None = None) -> int:
    """Colour the linear regions of a 2-D-input `model` on a dense grid, draw its decision boundary; return the region count."""
    import matplotlib.pyplot as plt

    xlim, ylim = _box(x, xlim, ylim)
    gx, gy, ids, outputs = _grid_regions(model, xlim, ylim, resolution)
    n_regions = int(ids.max()) + 1
    colours = np.random.default_rng(seed).permutation(n_regions)  # neighbours get unrelated colours
    ax = ax or plt.gca()
    ax.imshow(colours[ids].reshape(gx.shape), origin="lower", extent=(*xlim, *ylim), cmap="tab20",
              interpolation="nearest", aspect="auto", alpha=0.9)
    image = ids.reshape(gx.shape)
    edges = np.zeros(gx.shape, dtype=bool)  # pixels where the pattern changes: the neurons' boundaries
    edges[:, 1:] |= image[:, 1:] != image[:, :-1]
    edges[1:, :] |= image[1:, :] != image[:-1, :]
    ax.imshow(np.ma.masked_where(~edges, edges), origin="lower", extent=(*xlim, *ylim), cmap="gray_r",
              vmin=0, vmax=1.6, interpolation="nearest", aspect="auto")
    out = outputs.float().cpu()
    if out.ndim == 1 or out.shape[1] == 1:
        score = out.reshape(-1)
    elif out.shape[1] == 2:
        score = out[:, 1] - out[:, 0]
    else:
        score = None
    if score is not None:
        ax.contour(gx, gy, score.numpy().reshape(gx.shape), levels=[0.0], colors="k", linewidths=2)
    else:
        pred = out.argmax(1).numpy().reshape(gx.shape)
        ax.contour(gx, gy, pred, levels=np.arange(out.shape[1] - 1) + 0.5, colors="k", linewidths=2)
    if x is not None:
        xs = x.detach().cpu().numpy()
        labels = None if y is None else y.detach().cpu().numpy()
        ax.scatter(xs[:, 0], xs[:, 1], c=labels, cmap="coolwarm", s=8, edgecolors="white", linewidths=0.3)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_title(title if title is not None else f"{n_regions} linear regions")
    return n_regions
