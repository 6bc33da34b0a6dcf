"""Residual networks: the residual block with a projection shortcut, ResNet-9, and the plain/residual
deep nets of the degradation experiment (chapter 4).

A residual block computes `relu(branch(x) + shortcut(x))`: `branch` is conv-BN-ReLU-conv-BN,
`shortcut` is the identity when the shape is unchanged and a 1x1 convolution with BN (a
"projection", He et al. 2016, option B) when the stride or the number of channels changes.
"""

from __future__ import annotations

import torch
from torch import nn

RESNET9_CHANNELS = (64, 128, 256, 512)


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1, pool: bool = False) -> nn.Sequential:
    """A 3x3 convolution (no bias: BN follows), batch norm and ReLU, optionally followed by a 2x2 max-pool."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """`relu(branch(x) + shortcut(x))` with a 1x1-conv projection shortcut when stride or channels change."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"ResidualBlock supports stride 1 or 2, got {stride}")
        self.branch = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.branch(x) + self.shortcut(x))


def resnet9_channels(width: float = 1.0) -> tuple[int, int, int, int]:
    """The four channel counts of ResNet-9 at a width multiplier: 1.0 gives 64/128/256/512, 0.25 gives 16/32/64/128."""
    if not width > 0:
        raise ValueError(f"width must be a positive multiplier (1.0 = 64/128/256/512), got {width}")
    return tuple(max(1, round(c * width)) for c in RESNET9_CHANNELS)  # type: ignore[return-value]


def resnet9(width: float = 1.0, num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """ResNet-9: conv; conv+pool; residual; conv+pool; conv+pool; residual; global max-pool; linear."""
    c1, c2, c3, c4 = resnet9_channels(width)
    return nn.Sequential(
        conv_bn_relu(in_channels, c1),
        conv_bn_relu(c1, c2, pool=True),
        ResidualBlock(c2, c2),
        conv_bn_relu(c2, c3, pool=True),
        conv_bn_relu(c3, c4, pool=True),
        ResidualBlock(c4, c4),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(c4, num_classes),
    )


def _blocks_per_stage(depth: int) -> int:
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 14, 20, 26, 32, ...), got {depth}")
    return (depth - 2) // 6


def plain_net(depth: int, width: int = 16, num_classes: int = 10) -> nn.Sequential:
    """A plain CIFAR net of `depth` = 6n+2 weight layers (He et al. 2016, section 4.2): three stages of 2n
    conv-BN-ReLU layers with `width`, 2*width, 4*width channels, global average pool, linear; no shortcuts."""
    n = _blocks_per_stage(depth)
    layers: list[nn.Module] = [conv_bn_relu(3, width)]
    channels = width
    for stage in range(3):
        out = width * 2 ** stage
        for i in range(2 * n):
            stride = 2 if stage > 0 and i == 0 else 1
            layers.append(conv_bn_relu(channels, out, stride=stride))
            channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def residual_net(depth: int, width: int = 16, num_classes: int = 10) -> nn.Sequential:
    """The same net as `plain_net(depth, width)` with every pair of conv layers wrapped in a ResidualBlock."""
    n = _blocks_per_stage(depth)
    layers: list[nn.Module] = [conv_bn_relu(3, width)]
    channels = width
    for stage in range(3):
        out = width * 2 ** stage
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            layers.append(ResidualBlock(channels, out, stride=stride))
            channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


# The recipe of the "CIFAR-10 ResNet: 90% in less than 5 minutes" notebook (Kaggle, kmldas), as the
# chapter reproduces it: Adam, one-cycle learning rate up to 0.01, weight decay 1e-4, gradients
# clipped at 0.1 (each value), 8 epochs of batches of 400, random crop (reflect padding) and flip.
RECIPE = {"max_lr": 0.01, "weight_decay": 1e-4, "grad_clip": 0.1, "epochs": 8, "batch_size": 400}


def recipe_learner(model: nn.Module, train_data, valid_data=None, epochs: int = RECIPE["epochs"],
                   max_lr: float = RECIPE["max_lr"], weight_decay: float = RECIPE["weight_decay"],
                   grad_clip: float = RECIPE["grad_clip"], callbacks=(), mixed_precision: bool = True):
    """A `Learner` set up with the chapter's recipe: Adam, torch's OneCycleLR over `epochs`, value clipping, timing."""
    from .train import Learner, Timing

    steps_per_epoch = len(train_data)
    if steps_per_epoch == 0:
        raise ValueError("train_data has no batches: the one-cycle schedule needs len(train_data) >= 1")
    optimizer = torch.optim.Adam(model.parameters(), lr=max_lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, epochs=epochs,
                                                   steps_per_epoch=steps_per_epoch)
    return Learner(model, train_data, valid_data, optimizer=optimizer, mixed_precision=mixed_precision,
                   scheduler=schedule, clip_value=grad_clip, callbacks=[Timing(), *callbacks], name="ResNet-9 recipe")
