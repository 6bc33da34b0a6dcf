"""Residual networks: the residual block with a projection shortcut, ResNet-9, the plain/residual
deep nets of the degradation experiment and its training run (chapter 4).

A residual block computes `relu(branch(x) + shortcut(x))`: `branch` is conv-BN-ReLU-conv-BN,
`shortcut` is the identity when the shape is unchanged and a 1x1 convolution with BN (a
"projection", He et al. 2016, option B) when the stride or the number of channels changes.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import runtime
from .device import synchronize
from .step import NonFiniteLossError, TrainStep

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


def residual_net(depth: int, width: int = 16, num_classes: int = 10, block: type[nn.Module] = ResidualBlock) -> nn.Sequential:
    """The same net as `plain_net(depth, width)` with every pair of conv layers wrapped in a residual block.

    `block(in_channels, out_channels, stride)` builds each block (the chapter passes the reader's own class).
    """
    n = _blocks_per_stage(depth)
    layers: list[nn.Module] = [conv_bn_relu(3, width)]
    channels = width
    for stage in range(3):
        out = width * 2 ** stage
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            layers.append(block(channels, out, stride=stride))
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


# ---------------------------------------------------------------------------------------------
# The degradation experiment: one training run of a plain or residual net
# ---------------------------------------------------------------------------------------------

DRY_BATCH = 8  # images per training batch and per measuring chunk in a dry run (its estimate scales to the real ones)


def he_schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.MultiStepLR:
    """He et al.'s CIFAR-10 schedule scaled to `steps`: the rate divided by 10 at half and at three quarters of them."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, [steps // 2, (3 * steps) // 4], gamma=0.1)


def end_convs(model: nn.Module) -> tuple[nn.Conv2d, nn.Conv2d]:
    """The first and the last 3x3 convolution of `model` (1x1 projections are not counted)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    if not convs:
        raise ValueError("the model has no 3x3 convolution")
    return convs[0], convs[-1]


@torch.no_grad()
def _loss_and_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: TrainStep, meter,
                       chunk: int) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    if runtime.is_dry_run():  # a few small chunks: the meter's estimate scales them to the whole set
        keep = runtime.cut(math.ceil(len(x) / chunk)) * DRY_BATCH
        x, y, chunk = x[:keep], y[:keep], DRY_BATCH
    loss, correct = torch.zeros((), device=x.device), torch.zeros((), device=x.device, dtype=torch.long)
    for i in range(0, len(x), chunk):
        xb, yb = x[i:i + chunk], y[i:i + chunk]
        with meter.measure(batch=len(yb), low_precision=step.dtype is not None), step.autocast():
            preds = model(xb)
            loss += F.cross_entropy(preds.float(), yb, reduction="sum")
        correct += (preds.argmax(1) == yb).sum()
    model.train(was_training)
    return float(loss) / len(x), int(correct) / len(x)


def train_degradation_net(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eval_x: torch.Tensor,
                          eval_y: torch.Tensor, *, steps: int, batch: int, lr: float, seed: int, evals: int = 16,
                          grad_samples: int = 64, momentum: float = 0.9, weight_decay: float = 1e-4,
                          mixed_precision: bool = False, eval_chunk: int = 1000, name: str = "degradation") -> dict:
    """Train `model` as He et al. trained their CIFAR-10 nets, scaled to `steps`; measure its training loss and gradients.

    SGD with momentum and weight decay, the rate `lr` divided by 10 at half and three quarters of
    the steps (`he_schedule`), random batches of `batch` images of (x, y) drawn from `seed` (the
    same batches for every model given the same seed), through one `TrainStep`. Returns the
    loss and accuracy on the fixed training images (eval_x, eval_y) at `evals` + 1 evenly spaced
    steps (the first before any update), the norms of the gradients of the first and the last
    3x3 convolution at `grad_samples` steps spread over the training, the final loss and
    accuracy (NaN when the loss became inf or NaN: `diverged`), and the wall time. In a dry run the steps are
    cut (`fasttrain.runtime.cut`), the batches and measurements shrunk to `DRY_BATCH` images, and
    their cost counted for the real sizes.
    """
    if steps < 1 or batch < 1 or evals < 1 or grad_samples < 1:
        raise ValueError(f"steps, batch, evals and grad_samples must be positive, got {steps}, {batch}, {evals}, "
                         f"{grad_samples}")
    device = x.device
    # foreach: a few multi-tensor kernels per step instead of a few per parameter (the default on GPUs anyway)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)
    step = TrainStep(model, optimizer, F.cross_entropy, mixed_precision=mixed_precision,
                     scheduler=he_schedule(optimizer, steps), device=device, name=name)
    step.meter.plan(steps, steps * batch)
    eval_meter = runtime.meter("eval", f"{name} (training loss)")
    eval_at = sorted({round(i * steps / evals) for i in range(evals + 1)})
    eval_meter.plan(len(eval_at) * math.ceil(len(eval_x) / eval_chunk), len(eval_at) * len(eval_x))
    grad_at = {round(i * (steps - 1) / max(1, grad_samples - 1)) for i in range(grad_samples)}
    if runtime.is_dry_run():  # the steps are cut anyway; smaller batches keep them quick on a CPU
        batch = min(batch, DRY_BATCH)
    first, last = end_convs(model)
    out = {"steps": [], "loss": [], "acc": [], "grad_steps": [], "grad_first": [], "grad_last": [], "diverged": False}

    def record_gradients(event: str) -> None:
        if event == "after_backward" and step.steps in grad_at:
            scale = step.scaler.get_scale() if step.scaler is not None else 1.0  # fp16: the gradients are scaled
            out["grad_steps"].append(step.steps)
            out["grad_first"].append(float(first.weight.grad.float().norm()) / scale)
            out["grad_last"].append(float(last.weight.grad.float().norm()) / scale)

    def evaluate_now(done: int) -> None:
        loss, acc = _loss_and_accuracy(model, eval_x, eval_y, step, eval_meter, eval_chunk)
        out["steps"].append(done)
        out["loss"].append(loss)
        out["acc"].append(acc)

    generator = torch.Generator(device=device).manual_seed(seed)
    synchronize(device)
    start = time.perf_counter()
    model.train()
    done = 0
    try:
        for i in range(runtime.cut(steps)):
            if i in eval_at:
                evaluate_now(i)
            idx = torch.randint(0, len(x), (batch,), device=device, generator=generator)
            step(x[idx], y[idx], events=record_gradients)
            done = i + 1
        step.flush()
    except NonFiniteLossError:
        out["diverged"] = True
    if out["diverged"]:
        out["steps"].append(done)
        out["loss"].append(math.nan)
        out["acc"].append(math.nan)
    else:
        evaluate_now(done)
    synchronize(device)
    out.update(final_loss=out["loss"][-1], final_acc=out["acc"][-1], seconds=time.perf_counter() - start,
               planned_steps=steps, lr=lr, seed=seed)
    return out
