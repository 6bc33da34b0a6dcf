"""Checks for the exercises' tests that a submission cannot talk round.

- `Integrity` captures the comparison functions the tests use (torch.allclose, torch.equal, ...)
  before any student code runs; `integrity.check()` fails when one of them has been replaced,
  and the tests compare with the captured originals (`integrity.allclose(...)`).
- `assert_written_from_scratch(cls, *twins)` fails a class that subclasses a library twin
  (torch.optim.Adam, ...) instead of writing the update itself.
- `tripwires(*targets)` replaces library functions (torch.optim.adam.adam, torch.optim.Adam.step,
  ...) for the block; a call to any of them fails the test: the exercise was meant to be written,
  not delegated.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Callable, Iterator

import torch

# What the tests compare with: captured at import, before any cell of a notebook has run.
WATCHED = ("torch.allclose", "torch.equal", "torch.isclose", "torch.testing.assert_close", "torch.isfinite",
           "torch.Tensor.allclose", "torch.Tensor.equal", "math.isclose", "builtins.abs", "builtins.max",
           "builtins.min", "builtins.all", "builtins.any", "builtins.isinstance")


def _resolve(path: str):
    """The object at a dotted path such as 'torch.optim.Adam.step'."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(f"cannot find {path}")


def _owner(path: str):
    head, _, name = path.rpartition(".")
    return _resolve(head), name


class TamperingError(AssertionError):
    """A function the tests rely on was replaced."""


class Integrity:
    """The originals of WATCHED, and a check that they are still in place."""

    def __init__(self, watched: tuple[str, ...] = WATCHED):
        self.originals = {path: _resolve(path) for path in watched}

    def check(self) -> None:
        """Fail when any watched function is no longer the original one."""
        replaced = [path for path, original in self.originals.items() if _resolve(path) is not original]
        if replaced:
            raise TamperingError(f"{', '.join(replaced)} {'was' if len(replaced) == 1 else 'were'} replaced: the "
                                 f"tests compare with the originals, so this submission cannot pass them this way")

    def allclose(self, a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
        """torch.allclose as it was before any student code ran (after checking nothing was replaced)."""
        self.check()
        return bool(self.originals["torch.allclose"](a, b, rtol=rtol, atol=atol))

    def equal(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        self.check()
        return bool(self.originals["torch.equal"](a, b))

    def isclose(self, a: float, b: float, rel_tol: float = 1e-9, abs_tol: float = 0.0) -> bool:
        self.check()
        return bool(self.originals["math.isclose"](a, b, rel_tol=rel_tol, abs_tol=abs_tol))


def assert_written_from_scratch(cls: type, *twins: type) -> None:
    """Fail when `cls` is, or derives from, one of the library classes it is meant to re-implement."""
    for twin in twins:
        if cls is twin or (isinstance(cls, type) and issubclass(cls, twin)):
            raise AssertionError(f"{cls.__name__} derives from {twin.__module__}.{twin.__name__}: write the update "
                                 f"yourself instead of inheriting PyTorch's")


class TripwireTriggered(AssertionError):
    """A library function that the exercise must not call was called."""


@contextlib.contextmanager
def tripwires(*targets: str) -> Iterator[list[str]]:
    """Within the block, calling any of `targets` (dotted paths) raises TripwireTriggered; yields what fired."""
    fired: list[str] = []
    saved = []

    def wire(path: str) -> Callable:
        def tripped(*args, **kwargs):
            fired.append(path)
            raise TripwireTriggered(f"{path} was called: the exercise asks you to write this computation, "
                                    f"not to call a library's version of it")
        return tripped

    for path in targets:
        try:
            owner, name = _owner(path)
            getattr(owner, name)
        except (ImportError, AttributeError):
            continue  # not in this torch version: nothing to guard
        # An inherited attribute (torch.optim.AdamW.step is Adam's) is removed again afterwards, not set: setting it
        # would pin whatever the parent held then, another tripwire included, onto the subclass.
        own = isinstance(owner, type) and name in vars(owner) or not isinstance(owner, type)
        saved.append((owner, name, getattr(owner, name) if own else None, own))
        setattr(owner, name, wire(path))
    try:
        yield fired
    finally:
        for owner, name, original, own in reversed(saved):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


# The functional and class APIs of torch's optimizers, for the optimizer exercises. The private
# single-tensor, multi-tensor and fused kernels catch a functional API called through a reference
# taken before the tripwires were set.
_OPTIMIZERS = (("sgd", "SGD"), ("adam", "Adam"), ("adamw", "AdamW"), ("rmsprop", "RMSprop"), ("radam", "RAdam"))
OPTIMIZER_APIS = tuple(
    [f"torch.optim.{cls}.step" for _, cls in _OPTIMIZERS]
    + [f"torch.optim.{module}.{fn}" for module, _ in _OPTIMIZERS
       for fn in (module, f"_single_tensor_{module}", f"_multi_tensor_{module}", f"_fused_{module}")]
    + [f"torch.optim._functional.{module}" for module in ("sgd", "adam", "adamw", "rmsprop")])
