"""Forward hooks on a model's layers, registered for one block of code and always removed afterwards."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

from torch import nn

ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.GELU)


@contextlib.contextmanager
def forward_hooks(modules: Iterable[nn.Module], hook: Callable, pre: bool = False) -> Iterator[None]:
    """Call `hook(module, inputs)` (pre=True) or `hook(module, inputs, output)` on each module's forward, in the block."""
    handles = [(m.register_forward_pre_hook if pre else m.register_forward_hook)(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def activation_modules(model: nn.Module, activations: tuple[type[nn.Module], ...] = ACTIVATIONS) -> list[nn.Module]:
    """The model's activation modules, in the order they were defined; a clear error when there are none."""
    found = [m for m in model.modules() if isinstance(m, activations)]
    if not found:
        names = ", ".join(a.__name__ for a in activations)
        raise ValueError(f"The model has no activation modules ({names}). The hooks sit on the input of each "
                         f"activation module: build the model with nn.ReLU() modules instead of F.relu calls, "
                         f"or pass activations=(YourActivation,).")
    return found
