"""VGG-style networks: blocks of 3x3 convolutions (with BatchNorm) each ending in a 2x2 max pool, then a head.

A block keeps the resolution through its convolutions (3x3, padding 1) and halves it in the
pool; the next block doubles the width. The layers are Lazy (`LazyConv2d`, `LazyLinear`): they
learn their input size from the first batch, so a block needs only its output width.
`vgg_net` runs that first batch for you, so the model it returns can go straight to an optimizer.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .train import eval_mode

# (number of 3x3 convolutions, output channels) per block.
VGG_SMALL = ((1, 16), (1, 32), (1, 64))  # the smoke profile's net: quick on a CPU
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
