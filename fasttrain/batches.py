"""Batches that live on the device, and augmentation as batched tensor ops (no per-image Python).

`DeviceLoader` cuts shuffled batches out of tensors already on the device (a new permutation
every epoch, drawn on the device); `normalize`, `random_crop`, `random_flip` and `augment` work
on whole uint8 or float NCHW batches there. The data sets themselves come from `fasttrain.datasets`.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from . import distributed, runtime
from .datasets import CIFAR10_MEAN, CIFAR10_STD, balanced_subset, load_cifar10


# ---------------------------------------------------------------------------------------------
# Normalisation and augmentation on the device
# ---------------------------------------------------------------------------------------------

def normalize(images_uint8: torch.Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(images/255 - mean)/std per channel as float NCHW; uint8 input is on 0..255, float input on 0..1."""
    x = images_uint8
    scale = 1 / 255 if x.dtype == torch.uint8 else 1.0
    if x.ndim != 4:
        raise ValueError(f"normalize expects NCHW images, got shape {tuple(x.shape)}")
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    if mean.shape[1] != x.shape[1] or std.shape[1] != x.shape[1]:
        raise ValueError(f"mean/std have {mean.shape[1]}/{std.shape[1]} channels but the images have {x.shape[1]}")
    out = torch.addcmul(-mean / std, x.to(torch.float32), scale / std)
    return out.to(dtype)


def _uniform_ints(n: int, high: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """n random integers in [0, high) drawn on the generator's device (or `device`), moved to `device`."""
    where = generator.device if generator is not None else device
    return torch.randint(0, high, (n,), device=where, generator=generator).to(device)


def _source_index(pos: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Map positions in [-pad, size+pad) of a padded axis to indices of the unpadded axis."""
    if mode == "reflect":
        period = 2 * (size - 1)
        pos = pos.remainder(period)
        return torch.where(pos < size, pos, period - pos)
    if mode == "replicate":
        return pos.clamp(0, size - 1)
    if mode == "circular":
        return pos.remainder(size)
    raise ValueError(f"Unknown padding mode {mode!r}: use 'reflect', 'replicate', 'circular' or 'constant'")


def random_crop(images: torch.Tensor, padding: int = 4, mode: str = "reflect",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pad each image by `padding` (reflect/replicate/circular/constant) and cut a random HxW window from it."""
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0 or len(images) == 0:
        return images.clone()
    n, _, h, w = images.shape
    if mode == "reflect" and padding >= min(h, w):
        raise ValueError(f"reflect padding ({padding}) must be smaller than the image side ({min(h, w)})")
    dy = _uniform_ints(n, 2 * padding + 1, images.device, generator)
    dx = _uniform_ints(n, 2 * padding + 1, images.device, generator)
    rows = dy[:, None] + torch.arange(h, device=images.device)  # positions in the padded image
    cols = dx[:, None] + torch.arange(w, device=images.device)
    if mode == "constant":
        source = F.pad(images, (padding,) * 4)
    else:
        source = images
        rows, cols = _source_index(rows - padding, h, mode), _source_index(cols - padding, w, mode)
    batch = torch.arange(n, device=images.device)[:, None, None]
    # Advanced indexing around the channel slice gives [N, H, W, C]; bring channels back to dim 1.
    out = source[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = _uniform_ints(len(images), 2, images.device, generator).bool()
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def augment(images: torch.Tensor, padding: int = 4, mode: str = "reflect",
            generator: torch.Generator | None = None) -> torch.Tensor:
    """The standard CIFAR-10 augmentation: a random padded crop, then a random horizontal flip."""
    return random_flip(random_crop(images, padding, mode, generator), generator)


# ---------------------------------------------------------------------------------------------
# Batches that live on the device
# ---------------------------------------------------------------------------------------------

class DeviceLoader:
    """Batches (xb, yb) of tensors already on the device, reshuffled on the device every epoch.

    In a dry run (`fasttrain.runtime`) a pass stops after a few batches; `len()` still counts a whole pass.

    Under torch.distributed (`fasttrain.distributed`, with `shard=True`) each process takes its own
    shard of every pass: all draw the same permutation from `seed` and take every world_size-th
    index of it, so one step's batches together are one batch of world_size * batch_size (the
    batch size is per process, as with torch's DistributedSampler). A shuffled loader pads its
    shards to equal length (every process takes as many steps); an unshuffled one, for
    evaluation, shards exactly. `len()` and `num_samples` count this process's shard.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = True,
                 drop_last: bool = False, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 seed: int | None = None, shard: bool = True):
        if len(x) != len(y):
            raise ValueError(f"x ({len(x)}) and y ({len(y)}) must have the same number of samples")
        if x.device != y.device:
            raise ValueError(f"x is on {x.device} but y is on {y.device}: move both with .to(device)")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.drop_last, self.transform = batch_size, shuffle, drop_last, transform
        self.generator = None if seed is None else torch.Generator(device=x.device).manual_seed(seed)
        self.shard = shard

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def num_samples(self) -> int:
        """How many samples one epoch visits (all of them unless drop_last cuts the tail; this process's shard)."""
        if self.drop_last:
            return len(self) * self.batch_size
        return distributed.shard_size(len(self.x), pad=self.shuffle) if self._sharded() else len(self.x)

    def _sharded(self) -> bool:
        return self.shard and distributed.world_size() > 1

    def __len__(self) -> int:
        n = distributed.shard_size(len(self.x), pad=self.shuffle) if self._sharded() else len(self.x)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        order = torch.randperm(n, device=self.device, generator=self.generator) if self.shuffle else None
        if self._sharded():
            if self.shuffle and self.generator is None:
                raise ValueError("Under torch.distributed every process must draw the same permutation: give the "
                                 "DeviceLoader a seed (DeviceLoader(..., seed=0)), the same on every process")
            order = distributed.shard(order if order is not None else torch.arange(n, device=self.device),
                                      pad=self.shuffle)
            n = len(order)
        keep = runtime.dry_batch_samples() or self.batch_size  # an fp16 dry run on a CPU keeps a few samples a batch
        for b in range(runtime.cut(len(self))):
            sl = slice(b * self.batch_size, min(b * self.batch_size + keep, (b + 1) * self.batch_size, n))
            if order is None:
                xb, yb = self.x[sl], self.y[sl]
            else:
                idx = order[sl]
                xb, yb = self.x[idx], self.y[idx]
            if self.transform is not None:
                xb = self.transform(xb)
            yield xb, yb

    def state_dict(self) -> dict:
        """The random state of the shuffle and of the transform, so that a resumed training draws what it would have."""
        return {"generator": None if self.generator is None else self.generator.get_state(),
                "transform": self.transform.state_dict() if hasattr(self.transform, "state_dict") else None}

    def load_state_dict(self, state: dict) -> None:
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"].cpu())
        if state.get("transform") is not None:
            self.transform.load_state_dict(state["transform"])


def repeat_forever(batches: Iterable) -> Iterator:
    """Iterate `batches` again and again (a fresh pass each time, so a loader reshuffles); fail clearly when empty."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("got no batches (the data is empty): give at least one (x, y) batch")


class Preprocess:
    """uint8 batch -> (crop-and-flip augmented) normalised float batch in a memory format, on the device."""

    def __init__(self, augment: bool = False, dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 generator: torch.Generator | None = None):
        self.augment, self.dtype, self.generator = augment, dtype, generator
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, xb: torch.Tensor) -> torch.Tensor:
        if self.augment:
            xb = augment(xb, generator=self.generator)
        return normalize(xb, dtype=self.dtype).contiguous(memory_format=self.memory_format)

    def state_dict(self) -> dict:
        return {"generator": None if self.generator is None else self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"].cpu())


def cifar10_loaders(batch_size: int, root: str | os.PathLike | None = None, device: torch.device | str = "cpu",
                    n_train: int | None = None, n_test: int | None = None, augment_train: bool = True,
                    seed: int = 0, channels_last: bool = False, dtype: torch.dtype = torch.float32,
                    test_batch_size: int | None = None) -> tuple[DeviceLoader, DeviceLoader]:
    """(train_loader, test_loader) over CIFAR-10 on the device: balanced subsets if n_* given, normalised, train augmented."""
    device = torch.device(device)
    x_tr, y_tr = load_cifar10("train", root, device)
    x_te, y_te = load_cifar10("test", root, device)
    if n_train is not None:
        x_tr, y_tr = balanced_subset(x_tr, y_tr, n_train, seed)
    if n_test is not None:
        x_te, y_te = balanced_subset(x_te, y_te, n_test, seed)
    aug_gen = torch.Generator(device=device).manual_seed(seed + 1 + 1000 * distributed.rank())  # each process its own crops
    train = DeviceLoader(x_tr, y_tr, batch_size, shuffle=True, seed=seed,
                         transform=Preprocess(augment_train, dtype, channels_last, aug_gen))
    test = DeviceLoader(x_te, y_te, test_batch_size or batch_size, shuffle=False,
                        transform=Preprocess(False, dtype, channels_last))
    return train, test
