"""Sharpness: the top eigenvalue of the loss Hessian, by power iteration on Hessian-vector products.

The Hessian itself (parameters x parameters) is never formed: a Hessian-vector product is the
gradient of (gradient . v), one extra backward pass (Pearlmutter, 1994). Power iteration on it
converges to the eigenvalue of largest magnitude, which near the start of training and at the
edge of stability is the top (positive) one that sets the largest stable step of gradient
descent, 2 / lambda_max (Cohen et al., 2021; Kalra and Barkeshli, 2024).

Power iteration converges slowly when the top eigenvalues lie close together (a network
trained with cross-entropy on ten classes has a cluster of them), and until it converges its
estimate v.Hv lies *below* the top eigenvalue. A small change of the estimate from one
iteration to the next does not prove convergence (the iteration can crawl), so
`power_iteration` stops on the residual ||Hv - lambda v|| instead: for a unit v and a symmetric
H some eigenvalue lies within the residual of the estimate. It reports the iterations it took,
whether the residual reached the tolerance, and the residual itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import runtime


def hessian_vector_product(grads: list[torch.Tensor], params: list[torch.Tensor],
                           vector: list[torch.Tensor]) -> list[torch.Tensor]:
    """H v from gradients built with create_graph=True: the gradient of sum(grads * vector)."""
    dot = sum((g * v).sum() for g, v in zip(grads, vector))
    return list(torch.autograd.grad(dot, params, retain_graph=True))


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


@dataclass(frozen=True)
class TopEigenvalue:
    """How a power iteration ended: the estimate, the iterations it took, and two checks of convergence."""

    value: float        # v.Hv for the last unit vector v (a lower bound of lambda_max until it converges)
    iterations: int     # Hessian-vector products computed
    converged: bool     # the residual fell to `tol` within `max_iters`
    residual: float     # ||Hv - value * v|| / |value|: how far (relatively) v is from being an eigenvector


def power_iteration(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    xb: torch.Tensor, yb: torch.Tensor, max_iters: int = 1000, tol: float = 1e-3,
                    seed: int = 0) -> TopEigenvalue:
    """The largest-magnitude eigenvalue of the Hessian of loss_fn(model(xb), yb), with how the iteration ended.

    Stops when the relative residual ||Hv - lambda v|| / |lambda| is at most `tol` (then an
    eigenvalue lies within `tol` of the estimate, relatively), or after `max_iters` Hessian-vector
    products (a few in a dry run, whose cost estimate counts all `max_iters`: an upper bound).
    The start vector is drawn from `seed`.
    """
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    loss = loss_fn(model(xb), yb)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen).to(p.device, p.dtype) for p in params]
    norm = torch.sqrt(_dot(v, v))
    v = [x / norm for x in v]
    last = runtime.cut(max_iters)  # a dry run takes a few iterations; its estimate counts all max_iters
    meter = runtime.meter("other", "power iteration (Hessian-vector products)")
    meter.plan(max_iters)
    for iterations in range(1, last + 1):
        with meter.measure(batch=len(xb)):
            hv = hessian_vector_product(grads, params, v)
        estimate = _dot(v, hv).item()
        norm = torch.sqrt(_dot(hv, hv))
        if norm == 0:
            return TopEigenvalue(0.0, iterations, True, 0.0)
        residual = torch.sqrt(sum(((h - estimate * x) ** 2).sum() for h, x in zip(hv, v))).item() / abs(estimate)
        if residual <= tol or iterations == last:
            return TopEigenvalue(estimate, iterations, residual <= tol, residual)
        v = [x / norm for x in hv]
    raise AssertionError("unreachable: the last iteration returns")


def top_hessian_eigenvalue(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                           xb: torch.Tensor, yb: torch.Tensor, iters: int = 1000, tol: float = 1e-3,
                           seed: int = 0) -> float:
    """The largest-magnitude eigenvalue of the Hessian of loss_fn(model(xb), yb) w.r.t. the trainable parameters."""
    return power_iteration(model, loss_fn, xb, yb, max_iters=iters, tol=tol, seed=seed).value
