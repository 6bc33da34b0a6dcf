"""Time the fastest recipe (fasttrain.recipes) to 0.80, 0.85 and 0.90 CIFAR-10 test accuracy on this device.

Not a test: it prints numbers. Each budget (seconds of training) gets its own full one-cycle run,
sized from a short throughput probe, because a one-cycle run only reaches its best accuracy at
its end. The time to an accuracy is the shortest run that reached it (training seconds, the
whitening set-up included; evaluation is timed apart). The machine's load average is printed
before and after, since other jobs on a shared CPU slow every number here.

    FASTTRAIN_DATA=/path/to/cifar10 python benchmarks/fastest_recipe.py              # CPU budgets 180 s and 900 s
    python benchmarks/fastest_recipe.py --budgets 60 180 --widths 32 64 128
    python benchmarks/fastest_recipe.py --gpu                                         # the GPU recipe, 10 epochs
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import torch

from fasttrain.datasets import load_cifar10
from fasttrain.device import device_name, get_device
from fasttrain.recipes import GPU_RECIPE, cpu_recipe, train_recipe

THRESHOLDS = (0.80, 0.85, 0.90)


def load_average() -> str:
    """The 1/5/15-minute load averages, or 'n/a' where the OS has none."""
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def images_per_second(cfg, data, device) -> float:
    """Training throughput of `cfg` from a short run on 6 batches' worth of images."""
    probe = replace(cfg, epochs=1.0, n_train=6 * cfg.batch_size, tta=0)
    result = train_recipe(probe, (data[0], data[1], data[2][:500], data[3][:500]), device)
    return probe.n_train / result.train_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[180.0, 900.0],
                        help="training seconds to size one run each (CPU mode)")
    parser.add_argument("--epochs", type=float, nargs="+", default=None,
                        help="run these epoch counts instead of sizing runs from --budgets (CPU mode)")
    parser.add_argument("--widths", type=int, nargs=3, default=None, help="channel widths of the three conv groups")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--gpu", action="store_true", help="run the GPU recipe for its 10 epochs instead of budgets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = get_device("auto")
    x_tr, y_tr = load_cifar10("train", device=device)
    x_te, y_te = load_cifar10("test", device=device)
    data = (x_tr, y_tr, x_te, y_te)
    print(f"device: {device_name(device)}; load average before: {load_average()} (cores: {os.cpu_count()})")

    rows = []
    if args.gpu:
        configs = [GPU_RECIPE]
    else:
        base = cpu_recipe()
        if args.widths:
            base = replace(base, widths=tuple(args.widths))
        if args.batch_size:
            base = replace(base, batch_size=args.batch_size)
        if args.epochs:
            epoch_counts = args.epochs
        else:
            rate = images_per_second(base, data, device)
            print(f"throughput probe: {rate:.0f} training images/s with widths {base.widths}, batch {base.batch_size}")
            epoch_counts = [round(budget * rate / len(x_tr), 3) for budget in args.budgets]
        configs = [replace(base, epochs=e, ema_start_epoch=0.3 * e) for e in epoch_counts]
    for cfg in configs:
        start = time.perf_counter()
        result = train_recipe(cfg, data, device, seed=args.seed,
                              on_epoch=lambda r: print(f"  epoch {r['epoch']}: {r['train_seconds']:.0f} s", flush=True))
        eval_seconds = time.perf_counter() - start - result.train_seconds
        rows.append((cfg, result, eval_seconds))
        print(f"widths {cfg.widths} batch {cfg.batch_size} epochs {cfg.epochs:g}: "
              f"train {result.train_seconds:.1f} s, eval {eval_seconds:.1f} s, "
              f"test acc {result.test_acc:.4f} (tta={cfg.tta}), {result.test_acc_plain:.4f} (no tta)", flush=True)

    print(f"\nload average after: {load_average()}")
    print(f"{'accuracy':>9}  {'training seconds':>16}  run")
    for threshold in THRESHOLDS:
        hits = [(r.train_seconds, cfg) for cfg, r, _ in rows if r.test_acc >= threshold]
        if hits:
            seconds, cfg = min(hits, key=lambda h: h[0])
            print(f"{threshold:>9.2f}  {seconds:>16.1f}  widths {cfg.widths}, {cfg.epochs:g} epochs")
        else:
            best = max(rows, key=lambda row: row[1].test_acc)
            print(f"{threshold:>9.2f}  {'not reached':>16}  best {best[1].test_acc:.4f} "
                  f"in {best[1].train_seconds:.1f} s ({best[0].epochs:g} epochs)")


if __name__ == "__main__":
    main()
