"""Sharpness: the top eigenvalue of the loss Hessian, by power iteration on Hessian-vector products.

The Hessian itself (parameters x parameters) is never formed: a Hessian-vector product is the
gradient of (gradient . v), one extra backward pass (Pearlmutter, 1994). Power iteration on it
converges to the eigenvalue of largest magnitude, which near the start of training and at the
edge of stability is the top (positive) one that sets the largest stable step of gradient
descent, 2 / lambda_max (Cohen et al., 2021; Kalra and Barkeshli, 2024).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def hessian_vector_product(grads: list[torch.Tensor], params: list[torch.Tensor],
                           vector: list[torch.Tensor]) -> list[torch.Tensor]:
    """H v from gradients built with create_graph=True: the gradient of sum(grads * vector)."""
    dot = sum((g * v).sum() for g, v in zip(grads, vector))
    return list(torch.autograd.grad(dot, params, retain_graph=True))


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def top_hessian_eigenvalue(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                           xb: torch.Tensor, yb: torch.Tensor, iters: int = 20, tol: float = 1e-3,
                           seed: int = 0) -> float:
    """The largest-magnitude eigenvalue of the Hessian of loss_fn(model(xb), yb) w.r.t. the trainable parameters."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    loss = loss_fn(model(xb), yb)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen).to(p.device, p.dtype) for p in params]
    norm = torch.sqrt(_dot(v, v))
    v = [x / norm for x in v]
    eigenvalue = None
    for _ in range(iters):
        hv = hessian_vector_product(grads, params, v)
        new = _dot(v, hv).item()
        norm = torch.sqrt(_dot(hv, hv))
        if norm == 0:
            return 0.0
        v = [x / norm for x in hv]
        if eigenvalue is not None and abs(new - eigenvalue) <= tol * abs(new):
            return new
        eigenvalue = new
    return eigenvalue
