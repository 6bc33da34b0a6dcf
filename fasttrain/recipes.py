"""The fastest recipe: everything the course teaches, put together to train CIFAR-10 in few epochs.

The ideas follow Keller Jordan's airbench (github.com/KellerJordan/cifar10-airbench) and the
"How to train your ResNet" series by David Page (Myrtle.ai); the code is the course's own. Each
trick is a named piece with the reason it is there:

- data on the device, augmented there (random 2-pixel translations, and flips that alternate
  every epoch so each image is seen both ways);
- a frozen first layer that whitens 2x2 patches (PCA of the training patches), so the network
  starts from decorrelated inputs;
- a small VGG-like net (three conv groups, max-pooling, BatchNorm, GELU) whose convolutions start
  near the identity (Dirac initialisation), scaled logits;
- SGD with Nesterov momentum, hyperparameters in a form decoupled from batch size and momentum,
  a larger learning rate for the BatchNorm biases;
- a one-cycle learning-rate schedule (linear warm-up then linear decay, `fasttrain.schedules`);
- label smoothing;
- weight averaging (an exponential moving average copied back into the weights every few steps,
  like the Lookahead optimizer), growing stronger towards the end;
- test-time augmentation: the average of the logits of the image, its mirror, and two one-pixel
  shifts.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import runtime
from .batches import normalize, random_crop
from .device import autocast, synchronize
from .step import TrainStep
from .schedules import OneCycle


@dataclass(frozen=True)
class RecipeConfig:
    """The recipe's knobs; the defaults are the GPU recipe (aimed at 94% or more in 10 epochs).

    airbench94 reaches 94.0% on average with widths 64/256/256 and lr 11.5 in 9.9 epochs; the
    defaults here take airbench95's wider net (128/384/384) and lower rate (10.0), for a margin
    above 94% at 10 epochs.
    """

    epochs: float = 10.0
    batch_size: int = 1024
    widths: tuple[int, int, int] = (128, 384, 384)
    lr: float = 10.0                # per 1024 examples, decoupled from momentum
    momentum: float = 0.85
    weight_decay: float = 0.0153    # per 1024 examples, decoupled from the learning rate
    bias_lr_scale: float = 64.0     # BatchNorm biases learn this much faster
    label_smoothing: float = 0.2
    pct_start: float = 0.23         # share of the steps spent warming up
    start_frac: float = 0.2         # the learning rate starts at this share of its peak ...
    end_frac: float = 0.07          # ... and ends at this share
    whiten_kernel: int = 2
    whiten_bias_epochs: float = 3.0
    translate: int = 2
    flip: bool = True
    bn_momentum: float = 0.6
    logit_scale: float = 1 / 9
    ema_start_epoch: float = 3.0    # weight averaging starts here ...
    ema_every: int = 5              # ... and updates every this many steps
    ema_decay: float = 0.95         # per-step decay at the end of training
    ema_power: float = 3.0          # how fast the averaging strengthens over training
    tta: int = 2                    # 0: none, 1: mirror, 2: mirror and one-pixel shifts
    n_train: int | None = None      # train on the first n images (None: all 50,000)
    mixed_precision: bool = True    # bf16/fp16 autocast where the device has it
    cpu_bf16: bool = False          # with mixed_precision: bf16 on a CPU with AMX too (fasttrain.device.has_amx_bf16)
    channels_last: bool = False


GPU_RECIPE = RecipeConfig()


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------

class Scale(nn.Module):
    """Multiply by a constant (keeps the logits small at the start)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    """A 3x3 convolution without bias that starts close to the identity on its first c_in channels."""
    conv = nn.Conv2d(c_in, c_out, 3, padding="same", bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:min(c_in, c_out)])
    return conv


def _norm(channels: int, momentum: float) -> nn.BatchNorm2d:
    """BatchNorm with a learned bias and a fixed scale of one."""
    bn = nn.BatchNorm2d(channels, eps=1e-12, momentum=1 - momentum)
    bn.weight.requires_grad_(False)
    return bn


def conv_group(c_in: int, c_out: int, bn_momentum: float = 0.6) -> nn.Sequential:
    """conv, 2x2 max-pool, BN, GELU, conv, BN, GELU: halves the resolution."""
    return nn.Sequential(_conv(c_in, c_out), nn.MaxPool2d(2), _norm(c_out, bn_momentum), nn.GELU(),
                         _conv(c_out, c_out), _norm(c_out, bn_momentum), nn.GELU())


def make_net(widths: tuple[int, int, int] = (64, 256, 256), whiten_kernel: int = 2,
             bn_momentum: float = 0.6, logit_scale: float = 1 / 9) -> nn.Sequential:
    """The recipe's network: a frozen whitening conv, three conv groups, max-pool, linear, scaled logits."""
    w0 = 2 * 3 * whiten_kernel ** 2
    net = nn.Sequential(
        nn.Conv2d(3, w0, whiten_kernel, padding=0, bias=True),
        nn.GELU(),
        conv_group(w0, widths[0], bn_momentum),
        conv_group(widths[0], widths[1], bn_momentum),
        conv_group(widths[1], widths[2], bn_momentum),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(widths[2], 10, bias=False),
        Scale(logit_scale),
    )
    net[0].weight.requires_grad_(False)
    return net


@torch.no_grad()
def init_whitening(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set the conv's filters to the PCA-whitening of the images' patches (and their negatives)."""
    c, k = images.shape[1], conv.kernel_size[0]
    if conv.out_channels != 2 * c * k * k:
        raise ValueError(f"the whitening conv needs {2 * c * k * k} output channels, has {conv.out_channels}")
    patches = images.float().unfold(2, k, 1).unfold(3, k, 1)          # N, C, H', W', k, k
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)
    cov = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).reshape(-1, c, k, k)
    conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight.dtype))
    conv.bias.zero_()


# --------------------------------------------------------------------------------------------
# Augmentation, weight averaging, test-time augmentation
# --------------------------------------------------------------------------------------------

def epoch_images(images: torch.Tensor, flipped: torch.Tensor, epoch: int, translate: int, flip: bool,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One epoch's augmented training images: a fixed random half mirrored, all mirrored on odd epochs, shifted."""
    x = images
    if flip:
        mask = flipped ^ bool(epoch % 2)
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    if translate > 0:
        x = random_crop(x, padding=translate, mode="reflect", generator=generator)
    return x


class WeightAverage:
    """An exponential moving average of the weights, copied back into the model at each update (Lookahead-like)."""

    def __init__(self, model: nn.Module):
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        """average <- decay * average + (1 - decay) * weights; then weights <- average."""
        state = model.state_dict()
        for k, avg in self.average.items():
            avg.lerp_(state[k], 1 - decay)
            state[k].copy_(avg)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, tta: int = 0, batch_size: int = 2000,
            mixed_precision: bool = True, cpu_autocast: bool = False) -> torch.Tensor:
    """Logits for normalised images; tta=1 averages with the mirror image, tta=2 also with 1-pixel shifts."""
    if tta not in (0, 1, 2):
        raise ValueError(f"tta must be 0 (none), 1 (mirror) or 2 (mirror and shifts), got {tta}")
    model.eval()
    device = next(model.parameters()).device

    def mirror(x: torch.Tensor) -> torch.Tensor:
        return model(x) if tta == 0 else 0.5 * (model(x) + model(x.flip(-1)))

    out = []
    meter = runtime.meter("eval", "recipe predict")
    meter.plan(math.ceil(len(images) / batch_size), len(images))
    if runtime.is_dry_run():  # a few small batches: the same code path at a fraction of the cost
        batch_size = min(batch_size, runtime.dry_batch_samples() or 64)
        images = images[:runtime.cut(len(images), runtime.DRY_STEPS * batch_size)]
    for x in images.split(batch_size):
        with meter.measure(batch=len(x)), autocast(device, enabled=mixed_precision, cpu=cpu_autocast):
            logits = mirror(x).float()
            if tta == 2:
                padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
                h, w = x.shape[-2:]
                shifted = 0.5 * (mirror(padded[..., :h, :w]) + mirror(padded[..., 2:, 2:])).float()
                logits = 0.5 * logits + 0.5 * shifted
        out.append(logits.float())
    return torch.cat(out)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose largest logit is the label (in a dry run, of the few rows predicted)."""
    if len(logits) != len(labels) and runtime.is_dry_run():
        labels = labels[:len(logits)]
    return (logits.argmax(1) == labels).float().mean().item()


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

@dataclass
class RecipeResult:
    """What a run of the recipe produced: the model, accuracies, training seconds, per-epoch history."""

    model: nn.Module
    test_acc: float               # with the configured test-time augmentation
    test_acc_plain: float         # without it
    train_seconds: float          # training only (whitening init included; evaluation excluded)
    epochs: float                 # epochs trained (in a budgeted run: what the budget allowed)
    history: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    resizes: list[dict] = field(default_factory=list)  # a budgeted run's re-plans: step, new length, s/step


def _param_groups(model: nn.Module, cfg: RecipeConfig, lr: float, wd: float) -> list[dict]:
    """BatchNorm biases in their own group with a larger learning rate; decay kept at the same strength."""
    bn_biases = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters() if p.requires_grad]
    ids = {id(p) for p in bn_biases}
    others = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    bias_lr = lr * cfg.bias_lr_scale
    return [dict(params=bn_biases, lr=bias_lr, weight_decay=wd / bias_lr),
            dict(params=others, lr=lr, weight_decay=wd / lr)]


# A budgeted run times its steps after this many warm-up steps (the first ones pay for allocations and caches) ...
RESIZE_WARMUP_STEPS = 3
# ... over this many steps, and re-plans its length; it re-plans again after every whole epoch (which includes the
# per-epoch augmentation) whose pace differs from the last plan's by more than RESIZE_TOLERANCE.
RESIZE_TIMED_STEPS = 8
# The plan fills the budget less this share: a last partial epoch still pays a whole epoch's augmentation, and the
# final weight average comes after the last step (without it, 120-s runs trained for 121.4 s).
RESIZE_MARGIN = 0.02
RESIZE_TOLERANCE = 0.01  # 3% let 600-s runs end 80 s early (steps got faster after the first epoch)


def train_recipe(cfg: RecipeConfig, data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                 device: torch.device | str, seed: int = 0, eval_every: int = 0,
                 on_epoch: Callable[[dict], None] | None = None,
                 budget_seconds: float | None = None) -> RecipeResult:
    """Train the recipe on (x_train, y_train, x_test, y_test) uint8 NCHW images; evaluate every `eval_every` epochs.

    With `budget_seconds` the run is sized to that many seconds of training: `cfg.epochs` is only the first guess
    (from a throughput probe, say). The run times its own steps after a warm-up and stretches or shortens its
    one-cycle schedule to fill the budget (early, during the warm-up ramp, where a new length barely moves the
    rate), and checks the plan again against each whole epoch's pace. A one-cycle run is at its best only at
    its end, so the schedule must end when the budget does; a probe that misjudged the pace cannot leave half
    the budget unused (as a cold probe did: 625 images/s against 1,500 in the run).
    """
    if budget_seconds is not None and budget_seconds <= 0:
        raise ValueError(f"budget_seconds must be positive, got {budget_seconds}")
    device = torch.device(device)
    x_tr, y_tr, x_te, y_te = data
    if x_tr.dtype != torch.uint8 or x_tr.ndim != 4 or x_tr.shape[1] != 3:
        raise ValueError(f"train_recipe wants uint8 NCHW images (as load_cifar10 gives), got {x_tr.dtype} {tuple(x_tr.shape)}")
    if cfg.n_train is not None:
        x_tr, y_tr = x_tr[:cfg.n_train], y_tr[:cfg.n_train]
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    train_x = normalize(x_tr.to(device)).contiguous(memory_format=fmt)
    train_y = y_tr.to(device)
    test_x = normalize(x_te.to(device)).contiguous(memory_format=fmt)
    test_y = y_te.to(device)

    model = make_net(cfg.widths, cfg.whiten_kernel, cfg.bn_momentum, cfg.logit_scale).to(device, memory_format=fmt)
    # Hyperparameters in decoupled form (see airbench / Page): step size independent of momentum.
    kilostep = 1024 * (1 + 1 / (1 - cfg.momentum))
    lr = cfg.lr / kilostep
    wd = cfg.weight_decay * cfg.batch_size / kilostep
    groups = _param_groups(model, cfg, lr, wd)
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True)
    steps_per_epoch = len(train_x) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the {len(train_x)} training images")
    total_steps = math.ceil(steps_per_epoch * cfg.epochs)
    schedule = OneCycle(optimizer, [g["lr"] for g in groups], total_steps, cycle_momentum=False,
                        pct_start=cfg.pct_start, anneal_strategy="linear", div_factor=1 / cfg.start_frac,
                        final_div_factor=cfg.start_frac / cfg.end_frac)
    smoothed_sum = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction="sum")
    train_step = TrainStep(model, optimizer, lambda logits, y: smoothed_sum(logits.float(), y),
                           mixed_precision=cfg.mixed_precision, scheduler=schedule, device=device, name="recipe",
                           cpu_autocast=cfg.cpu_bf16)
    train_step.meter.plan(total_steps, total_steps * cfg.batch_size)
    ema_start, ema_every = cfg.ema_start_epoch * steps_per_epoch, cfg.ema_every
    if runtime.is_dry_run():  # a dry run takes a few steps: average from the first, so that path runs too
        ema_start, ema_every = 0, 1

    ema_share = cfg.ema_start_epoch / cfg.epochs  # weight averaging starts at this share of the run
    resizes: list[dict] = []

    def replan(seconds_per_step: float, spent: float) -> None:
        """Set the run's length so that the steps left fill what is left of the budget."""
        nonlocal total_steps, ema_start, epochs
        new_total = step + max(1, int((budget_seconds * (1 - RESIZE_MARGIN) - spent) / seconds_per_step))
        resizes.append({"at_step": step, "total_steps": new_total, "was": total_steps,
                        "seconds_per_step": seconds_per_step})
        total_steps = schedule.total_steps = new_total
        ema_start = ema_share * total_steps
        epochs = math.ceil(total_steps / steps_per_epoch)

    train_seconds, step, history, average = 0.0, 0, [], None
    synchronize(device)
    start = time.perf_counter()
    init_whitening(model[0], train_x[:5000])
    flipped = torch.rand(len(train_x), device=device, generator=gen) < 0.5
    synchronize(device)
    train_seconds += time.perf_counter() - start

    epochs = math.ceil(cfg.epochs)
    budgeted = budget_seconds is not None and not runtime.is_dry_run()
    epoch = 0
    while epoch < runtime.cut(epochs):
        synchronize(device)
        start = time.perf_counter()
        epoch_start_step = step
        model.train()
        model[0].bias.requires_grad_(epoch < cfg.whiten_bias_epochs)
        x_epoch = epoch_images(train_x, flipped, epoch, cfg.translate, cfg.flip, gen)
        order = torch.randperm(len(train_x), device=device, generator=gen)
        for b in range(runtime.cut(steps_per_epoch)):
            if step >= total_steps:
                break
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            _, loss = train_step(*runtime.cut_batch(x_epoch[idx], train_y[idx]))  # fp16 dry run on a CPU: a few samples
            step += 1
            if budgeted and epoch == 0 and step in (RESIZE_WARMUP_STEPS, RESIZE_WARMUP_STEPS + RESIZE_TIMED_STEPS):
                synchronize(device)
                now = time.perf_counter()
                if step == RESIZE_WARMUP_STEPS:
                    timed_from = now
                else:
                    replan((now - timed_from) / RESIZE_TIMED_STEPS, train_seconds + now - start)
            if step >= ema_start and step % ema_every == 0:
                if average is None:
                    average = WeightAverage(model)
                else:
                    decay = cfg.ema_decay ** ema_every * (step / total_steps) ** cfg.ema_power
                    average.update(model, decay)
        if average is not None:
            average.update(model, 1.0)
        synchronize(device)
        train_seconds += time.perf_counter() - start
        if budgeted and step - epoch_start_step == steps_per_epoch:  # a whole epoch, augmentation included
            pace = (time.perf_counter() - start) / (step - epoch_start_step)
            off_plan = not resizes or abs(pace / resizes[-1]["seconds_per_step"] - 1) > RESIZE_TOLERANCE
            if off_plan and budget_seconds - train_seconds >= pace:  # and at least one more step fits the budget
                replan(pace, train_seconds)
        record = {"epoch": epoch + 1, "train_seconds": train_seconds, "train_loss": loss.item() / len(idx)}
        last = epoch == runtime.cut(epochs) - 1 or step >= total_steps
        if eval_every and ((epoch + 1) % eval_every == 0) and not last:
            record["test_acc_plain"] = accuracy(predict(model, test_x, 0, mixed_precision=cfg.mixed_precision, cpu_autocast=cfg.cpu_bf16), test_y)
        history.append(record)
        if on_epoch is not None and not last:
            on_epoch(record)
        epoch += 1
        if last:
            break

    plain = accuracy(predict(model, test_x, 0, mixed_precision=cfg.mixed_precision, cpu_autocast=cfg.cpu_bf16), test_y)
    with_tta = accuracy(predict(model, test_x, cfg.tta, mixed_precision=cfg.mixed_precision, cpu_autocast=cfg.cpu_bf16), test_y) if cfg.tta else plain
    history[-1].update(test_acc_plain=plain, test_acc=with_tta)
    if on_epoch is not None:
        on_epoch(history[-1])
    trained = step / steps_per_epoch if budgeted else cfg.epochs
    return RecipeResult(model, with_tta, plain, train_seconds, trained, history, asdict(cfg), resizes)


def cpu_recipe(**changes) -> RecipeConfig:
    """The recipe scaled for a small CPU: narrower, fewer epochs (override any field by keyword)."""
    base = RecipeConfig(epochs=2.0, batch_size=256, widths=(32, 64, 128), ema_start_epoch=0.6,
                        whiten_bias_epochs=1.0, tta=1, mixed_precision=False, channels_last=True)
    return replace(base, **changes)


def cpu_budget_recipe(budget_seconds: float, **changes) -> RecipeConfig:
    """The recipe sized for `budget_seconds` of training on a CPU: bf16 where the CPU has AMX, width by budget.

    Measured on a 2-core AMX Xeon, two threads, one seed each, 3 December 2026 (benchmarks/README.md has the
    3-seed table): at 120 s, widths 64/128/256 (3.5 epochs) reached 0.867 with TTA against 0.863 for 32/64/128
    (7.2 epochs); at 600 s, 64/256/256 with batch 512 (12.8 epochs) reached 0.912. `epochs` is only the first
    guess: a budgeted `train_recipe` run re-plans its length from its own pace.
    """
    if budget_seconds <= 0:
        raise ValueError(f"budget_seconds must be positive, got {budget_seconds}")
    if budget_seconds < 300:
        base = cpu_recipe(widths=(64, 128, 256), batch_size=256, whiten_bias_epochs=1.0)
    else:
        base = cpu_recipe(widths=(64, 256, 256), batch_size=512, whiten_bias_epochs=3.0)
    base = replace(base, mixed_precision=True, cpu_bf16=True, tta=2)
    return replace(base, **changes)
