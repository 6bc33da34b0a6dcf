"""Time the fastest recipe (fasttrain.recipes) to 0.80, 0.85 and 0.90 CIFAR-10 test accuracy on this device.

Not a test: it prints numbers. Each budget (seconds of training) gets its own full one-cycle run,
because a one-cycle run only reaches its best accuracy at its end. A throughput probe, timed after a
warm-up run, gives each run its first plan; the run then times its own steps and re-plans its
length to end with the budget (`train_recipe(..., budget_seconds=)`), so a probe that misjudged the
pace cannot leave the budget unused. Each budget runs once per seed; the table gives the mean and
spread. Training seconds include the whitening set-up; evaluation is timed apart. The machine's
load average is printed before and after, since other jobs on a shared CPU slow every number here.

    FASTTRAIN_DATA=/path/to/cifar10 python benchmarks/fastest_recipe.py              # CPU budgets 120 s and 600 s
    python benchmarks/fastest_recipe.py --budgets 120 --seeds 0 1 2 --widths 32 64 128
    python benchmarks/fastest_recipe.py --gpu                                         # the GPU recipe, 10 epochs
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace

import torch

from fasttrain.datasets import load_cifar10
from fasttrain.device import device_name, get_device
from fasttrain.device import has_amx_bf16
from fasttrain.recipes import GPU_RECIPE, cpu_budget_recipe, train_recipe

THRESHOLDS = (0.80, 0.85, 0.90)


def load_average() -> str:
    """The 1/5/15-minute load averages, or 'n/a' where the OS has none."""
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def images_per_second(cfg, data, device) -> float:
    """Training throughput of `cfg`: a short run on 6 batches' worth of images, timed on its second go.

    The first run pays one-time costs (allocator growth, kernel selection, caches) and measured 625 images/s
    where the epochs then ran at 1,500; the timed run comes after it, and it still includes the whitening
    set-up, so it errs low. The budgeted runs correct what is left by timing themselves."""
    probe = replace(cfg, epochs=1.0, n_train=6 * cfg.batch_size, tta=0)
    small = (data[0], data[1], data[2][:500], data[3][:500])
    train_recipe(probe, small, device)  # warm-up, not timed
    result = train_recipe(probe, small, device)
    return probe.n_train / result.train_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[120.0, 600.0],
                        help="training seconds to size one run each (CPU mode)")
    parser.add_argument("--epochs", type=float, nargs="+", default=None,
                        help="run these epoch counts instead of sizing runs from --budgets (CPU mode)")
    parser.add_argument("--widths", type=int, nargs=3, default=None, help="channel widths of the three conv groups")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--fp32", action="store_true",
                        help="train in fp32 even on a CPU with AMX (by default the recipe autocasts to bf16 there)")
    parser.add_argument("--tta", type=int, default=2, choices=[0, 1, 2],
                        help="test-time augmentation: 0 none, 1 mirror, 2 mirror and shifts (evaluation only, "
                             "off the training clock; default 2, as the GPU recipe)")
    parser.add_argument("--gpu", action="store_true", help="run the GPU recipe for its 10 epochs instead of budgets")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per budget and seed")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = get_device("auto")
    x_tr, y_tr = load_cifar10("train", device=device)
    x_te, y_te = load_cifar10("test", device=device)
    data = (x_tr, y_tr, x_te, y_te)
    print(f"device: {device_name(device)}; load average before: {load_average()} (cores: {os.cpu_count()})")

    runs = []  # (label, cfg, budget or None, seed, result, eval seconds)
    if args.gpu:
        plans = [("GPU recipe, 10 epochs", GPU_RECIPE, None)]
    else:
        def base(budget):
            cfg = cpu_budget_recipe(budget, tta=args.tta)
            if args.fp32:
                cfg = replace(cfg, mixed_precision=False, cpu_bf16=False)
            if args.widths:
                cfg = replace(cfg, widths=tuple(args.widths))
            if args.batch_size:
                cfg = replace(cfg, batch_size=args.batch_size)
            return cfg

        print(f"AMX bf16 on this CPU: {has_amx_bf16()}; dtype: "
              f"{'fp32' if args.fp32 or device.type != 'cpu' or not has_amx_bf16() else 'bf16 autocast'}")
        if args.epochs:
            plans = [(f"{e:g} epochs", replace(base(max(args.budgets)), epochs=e, ema_start_epoch=0.3 * e), None)
                     for e in args.epochs]
        else:
            plans = []
            for budget in args.budgets:
                cfg = base(budget)
                rate = images_per_second(cfg, data, device)
                print(f"throughput probe (after a warm-up run): {rate:.0f} training images/s with widths {cfg.widths}, "
                      f"batch {cfg.batch_size}", flush=True)
                e = round(budget * rate / len(x_tr), 3)
                plans.append((f"{budget:g} s budget", replace(cfg, epochs=e, ema_start_epoch=0.3 * e), budget))
    for label, cfg, budget in plans:
        for seed in args.seeds:
            start = time.perf_counter()
            result = train_recipe(cfg, data, device, seed=seed, budget_seconds=budget,
                                  on_epoch=lambda r: print(f"  epoch {r['epoch']}: {r['train_seconds']:.0f} s", flush=True))
            eval_seconds = time.perf_counter() - start - result.train_seconds
            runs.append((label, cfg, budget, seed, result, eval_seconds))
            replans = "; ".join(f"step {r['at_step']}: {r['was']} -> {r['total_steps']} steps "
                                f"({r['seconds_per_step'] * 1000:.0f} ms/step)" for r in result.resizes)
            print(f"{label}, seed {seed}: widths {cfg.widths} batch {cfg.batch_size}, {result.epochs:.2f} epochs "
                  f"(planned {cfg.epochs:g}): train {result.train_seconds:.1f} s, eval {eval_seconds:.1f} s, "
                  f"test acc {result.test_acc:.4f} (tta={cfg.tta}), {result.test_acc_plain:.4f} (no tta)"
                  + (f"; re-planned at {replans}" if replans else ""), flush=True)

    print(f"\nload average after: {load_average()}")
    print(f"{'run':<22}{'seeds':>6}{'epochs':>8}{'training s':>18}{'test acc (TTA)':>20}{'no TTA':>18}"
          + "".join(f"{'>= ' + format(t, '.2f'):>9}" for t in THRESHOLDS))
    for label, *_ in plans:
        rs = [r for (l, _, _, _, r, _) in runs if l == label]

        def ms(values, fmt):
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):{fmt}} ± {sd:{fmt}}"

        print(f"{label:<22}{len(rs):>6}{statistics.mean(r.epochs for r in rs):>8.2f}"
              f"{ms([r.train_seconds for r in rs], '.1f'):>18}{ms([r.test_acc for r in rs], '.4f'):>20}"
              f"{ms([r.test_acc_plain for r in rs], '.4f'):>18}"
              + "".join(f"{f'{sum(r.test_acc >= t for r in rs)}/{len(rs)}':>9}" for t in THRESHOLDS))

if __name__ == "__main__":
    main()
