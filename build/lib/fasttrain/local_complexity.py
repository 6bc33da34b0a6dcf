"""Local complexity (LC): how many neuron boundaries pass close to a point (Humayun, Balestriero, Baraniuk, ICML 2024).

Around each point x we take P orthonormal directions v_p and the 2P vertices x +- r v_p of a
cross-polytope, pass the vertices through the network, and count, layer by layer, the neurons
whose pre-activation does not have the same sign on all 2P vertices. The LC of a point is that
count summed over the layers; the LC of a set of points is the mean over its points.

For the first layer the count is exact (a neuron w.x + b counts if and only if
|w.x + b| < r max_p |w.v_p|, see `first_layer_closed_form`). Deeper layers only see the images
of the vertices, not of the whole neighbourhood, so their counts are an approximation.

A "neuron" is one entry of the input of an activation module (`nn.ReLU`, `nn.GELU`, ...): one
unit of a linear layer, or one channel at one position of a convolution (after BatchNorm,
which is put in eval mode while measuring). The hooks sit on the activation modules, so a model
must use them as modules, not as `F.relu` calls.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from .hooks import ACTIVATIONS, activation_modules, forward_hooks
from .train import Callback, eval_mode


def orthonormal_directions(dim: int, n: int, seed: int = 0, device: torch.device | str | None = None,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`n` random orthonormal directions in R^dim, as the rows of an (n, dim) tensor (the same for a given seed)."""
    if not 1 <= n <= dim:
        raise ValueError(f"Need 1 <= n_directions <= input dimension to have orthonormal directions; "
                         f"got n={n} in dimension {dim}. Use at most {dim} directions.")
    gen = torch.Generator().manual_seed(int(seed))
    gauss = torch.randn(dim, n, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    q = q * torch.sign(torch.diagonal(r))  # a uniformly random frame, not one biased by QR's sign convention
    return q.T.contiguous().to(device=device, dtype=dtype)


def cross_polytope(x: torch.Tensor, directions: torch.Tensor, r: float) -> torch.Tensor:
    """The 2P vertices x + r v_p (first P) and x - r v_p (last P) around each point: shape (B, 2P, *x.shape[1:])."""
    flat = x.reshape(x.shape[0], -1)
    if directions.ndim != 2 or directions.shape[1] != flat.shape[1]:
        raise ValueError(f"directions must have shape (P, {flat.shape[1]}) for points of shape {tuple(x.shape[1:])}; "
                         f"got {tuple(directions.shape)}")
    step = r * directions.to(device=x.device, dtype=x.dtype)
    vertices = torch.cat([flat[:, None, :] + step, flat[:, None, :] - step], dim=1)
    return vertices.reshape(x.shape[0], 2 * directions.shape[0], *x.shape[1:])


def count_sign_changes(pre: torch.Tensor) -> torch.Tensor:
    """From pre-activations at the vertices, shape (B, V, *neurons): per point, how many neurons change sign."""
    if pre.ndim < 3:
        raise ValueError(f"pre-activations must have shape (points, vertices, *neurons); got {tuple(pre.shape)}")
    signs = torch.sign(pre).reshape(pre.shape[0], pre.shape[1], -1)
    return (signs != signs[:, :1]).any(dim=1).sum(dim=-1)


def first_layer_closed_form(layer: nn.Linear, x: torch.Tensor, directions: torch.Tensor, r: float) -> torch.Tensor:
    """Exact count of the first linear layer's neurons whose hyperplane crosses the cross-polytope, per point."""
    w = layer.weight.detach()
    a = x.reshape(x.shape[0], -1).to(w.dtype) @ w.T
    if layer.bias is not None:
        a = a + layer.bias.detach()
    reach = r * (directions.to(device=w.device, dtype=w.dtype) @ w.T).abs().amax(dim=0)
    return (a.abs() < reach).sum(dim=1)


@torch.no_grad()
def local_complexity(model: nn.Module, x: torch.Tensor, r: float, n_directions: int = 25, seed: int = 0,
                     batch_size: int = 256, per_layer: bool = False,
                     activations: tuple[type[nn.Module], ...] = ACTIVATIONS,
                     directions: torch.Tensor | None = None) -> torch.Tensor:
    """LC of each point of `x` (shape (N,)); with `per_layer`, the counts per activation layer (shape (N, L))."""
    param = next(model.parameters())
    x = x.to(device=param.device, dtype=param.dtype)
    if directions is None:
        directions = orthonormal_directions(x[0].numel(), n_directions, seed, device=x.device, dtype=x.dtype)
    n_vertices = 2 * directions.shape[0]
    counts_of_batch: list[torch.Tensor] = []

    def count(module, inputs):
        pre = inputs[0]
        counts_of_batch.append(count_sign_changes(pre.reshape(-1, n_vertices, *pre.shape[1:])))

    chunks = []
    with forward_hooks(activation_modules(model, activations), count, pre=True), eval_mode(model):
        for start in range(0, x.shape[0], batch_size):
            xb = x[start:start + batch_size]
            counts_of_batch.clear()
            model(cross_polytope(xb, directions, r).reshape(-1, *x.shape[1:]))
            chunks.append(torch.stack(counts_of_batch, dim=1))
    counts = torch.cat(chunks)
    return counts if per_layer else counts.sum(dim=1).float()


def log_spaced_steps(last: int, n: int = 40) -> list[int]:
    """About `n` distinct steps from 0 to `last`, evenly spaced on a log axis (0 and `last` included)."""
    if last < 1:
        raise ValueError(f"last must be a positive number of steps, got {last}")
    steps = np.unique(np.round(np.geomspace(1, last, n)).astype(int))
    return [0, *(int(s) for s in steps)]


class LocalComplexityMonitor(Callback):
    """Measure the mean LC of fixed sets of points (train, test, random, ...) at chosen steps; log them to a board.

    Use it as a `Learner` callback, or call `maybe_measure(model, step)` from a loop of your own.
    `metrics(model)` may return more values (accuracies, losses) logged beside the LC at the same steps.
    The board gets them at x = step + 1, so that the measure at step 0 shows on a log axis.
    """

    order = 15

    def __init__(self, points: Mapping[str, torch.Tensor], r: float, steps: Iterable[int], n_directions: int = 25,
                 seed: int = 0, batch_size: int = 256, board=None,
                 metrics: Callable[[nn.Module], dict] | None = None):
        if not points:
            raise ValueError("points must name at least one set, e.g. {'train': x_train, 'test': x_test}")
        self.points, self.r, self.steps = dict(points), r, set(int(s) for s in steps)
        self.n_directions, self.seed, self.batch_size = n_directions, seed, batch_size
        self.board, self.metrics = board, metrics
        self.history: list[dict] = []

    def measure(self, model: nn.Module, step: int) -> dict:
        """LC of every set (`lc_<name>`) and the extra metrics at this step; appended to `history` and logged."""
        values = {}
        for name, x in self.points.items():
            values[f"lc_{name}"] = float(local_complexity(model, x, self.r, self.n_directions, self.seed,
                                                          self.batch_size).mean())
        if self.metrics is not None:
            values.update(self.metrics(model))
        self.history.append({"step": step, **values})
        if self.board is not None:
            self.board.log(step + 1, **values)
        return values

    def maybe_measure(self, model: nn.Module, step: int) -> dict | None:
        """Measure when `step` is one of the chosen steps; return the values or None."""
        return self.measure(model, step) if step in self.steps else None

    def before_fit(self) -> None:
        self.maybe_measure(self.learner.model, 0)

    def after_step(self) -> None:
        self.maybe_measure(self.learner.model, self.learner.n_steps)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one logged quantity, for plotting."""
        rows = [h for h in self.history if key in h]
        return np.array([h["step"] for h in rows]), np.array([h[key] for h in rows])
