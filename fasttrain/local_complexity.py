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

`StackedMLP` trains several MLPs of one layout at once (one per seed, or per variant): one batched
matrix product per layer for all of them. A tiny MLP's training step on a GPU is bound by kernel
launches, not by arithmetic, so a stack of M networks costs about as much as one; `member(i)` gives
network i back as a plain `nn.Sequential`, which `local_complexity` measures.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, Mapping, Sequence

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


# ---------------------------------------------------------------------------------------------
# Several MLPs trained at once
# ---------------------------------------------------------------------------------------------

class _StackedLinear(nn.Module):
    """M linear layers applied at once: (M, N, in) -> (M, N, out), member i with its own weight and bias."""

    def __init__(self, layers: Sequence[nn.Linear]):
        super().__init__()
        if any(layer.bias is None for layer in layers):
            raise ValueError("StackedMLP needs linear layers with a bias")
        self.weight = nn.Parameter(torch.stack([layer.weight.detach().T for layer in layers]).clone())  # (M, in, out)
        self.bias = nn.Parameter(torch.stack([layer.bias.detach() for layer in layers])[:, None, :].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)

    def unstack(self, i: int, layer: nn.Linear) -> None:
        layer.weight.copy_(self.weight[i].T)
        layer.bias.copy_(self.bias[i, 0])


class _StackedBatchNorm(nn.Module):
    """M BatchNorm1d layers at once: one BatchNorm1d over M * features channels, so each member has its own statistics."""

    def __init__(self, layers: Sequence[nn.BatchNorm1d]):
        super().__init__()
        first = layers[0]
        self.features = first.num_features
        self.norm = nn.BatchNorm1d(len(layers) * self.features, eps=first.eps, momentum=first.momentum)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(self.norm, name).copy_(torch.cat([getattr(layer, name) for layer in layers]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, n, w = x.shape
        return self.norm(x.transpose(0, 1).reshape(n, m * w)).reshape(n, m, w).transpose(0, 1)

    def unstack(self, i: int, layer: nn.BatchNorm1d) -> None:
        part = slice(i * self.features, (i + 1) * self.features)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(layer, name).copy_(getattr(self.norm, name)[part])
        layer.num_batches_tracked.copy_(self.norm.num_batches_tracked)


class StackedMLP(nn.Module):
    """Several MLPs of the same layout (nn.Linear, nn.BatchNorm1d, activations) trained as one module.

    `StackedMLP([net_0, net_1, ...])` copies the networks' weights; `forward` takes (M, N, d), each member
    its own batch, or (N, d), the same batch for all, and returns (M, N, outputs). The members share
    nothing but the optimizer's step (with Adam or AdamW each parameter entry has its own moments, so a
    member trains as it would alone when the loss is a sum over members). `member(i)` returns network i
    with its current weights, as an `nn.Sequential` like the ones it was built from.
    """

    def __init__(self, models: Sequence[nn.Sequential]):
        super().__init__()
        if not models:
            raise ValueError("StackedMLP needs at least one network")
        layouts = {tuple(type(m).__name__ for m in model) for model in models}
        if len(layouts) != 1:
            raise ValueError(f"StackedMLP needs networks of one layout; got {sorted(layouts)}")
        shapes = {tuple(tuple(p.shape) for p in model.parameters()) for model in models}
        if len(shapes) != 1:
            raise ValueError("StackedMLP needs networks whose layers have the same sizes")
        self._template = (copy.deepcopy(models[0]).cpu(),)  # in a tuple: not a submodule, so not trained
        layers = []
        for group in zip(*models):
            if isinstance(group[0], nn.Linear):
                layers.append(_StackedLinear(group))
            elif isinstance(group[0], nn.BatchNorm1d):
                layers.append(_StackedBatchNorm(group))
            elif any(True for _ in group[0].parameters()):
                raise TypeError(f"StackedMLP cannot stack {type(group[0]).__name__} layers (only nn.Linear, "
                                f"nn.BatchNorm1d and parameter-free layers such as activations)")
            else:
                layers.append(copy.deepcopy(group[0]))
        self.layers = nn.Sequential(*layers)
        self.members = len(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            x = x.expand(self.members, *x.shape)
        if x.ndim != 3 or x.shape[0] != self.members:
            raise ValueError(f"StackedMLP of {self.members} networks takes inputs of shape (N, d) or "
                             f"({self.members}, N, d); got {tuple(x.shape)}")
        return self.layers(x)

    @torch.no_grad()
    def member(self, i: int) -> nn.Sequential:
        """Network i with its current weights (and BatchNorm statistics), on the stack's device."""
        if not 0 <= i < self.members:
            raise IndexError(f"member {i} of a stack of {self.members} networks")
        first = next(self.parameters())
        net = copy.deepcopy(self._template[0]).to(first.device)
        for stacked, layer in zip(self.layers, net):
            if hasattr(stacked, "unstack"):
                stacked.unstack(i, layer)
        return net.train(self.training)
