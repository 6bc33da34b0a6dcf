"""Benchmark 3: time to accuracy with the chapter's recipe on all of CIFAR-10.

ResNet-9 (width 1.0 by default on a GPU, 0.25 on a CPU), Adam, one-cycle up to 0.01, weight decay
1e-4, gradients clipped at 0.1, batches of 400, random crop (reflect) and flip, on the fast data
path (`fasttrain.resnet.recipe_learner`, `fasttrain.batches.cifar10_loaders`). The full test set
is evaluated several times per epoch; the script prints the training time (evaluations
excluded) and the wall time (included) at which test accuracy first reaches each threshold,
and stops (after one last evaluation) at the first step that ends past the wall-time budget.

Usage: python benchmarks/time_to_accuracy.py [--device cuda] [--width 1.0] [--epochs 8] [--budget-s 660]
"""

from __future__ import annotations

import time

import torch

from common import base_parser, load_line, setup
from fasttrain.batches import cifar10_loaders
from fasttrain.device import synchronize
from fasttrain.costs import count_parameters
from fasttrain.resnet import RECIPE, recipe_learner, resnet9
from fasttrain.speed import format_table
from fasttrain.train import CancelFit, Callback, evaluate


class EvaluateAndBudget(Callback):
    """Evaluate on the test set every `every` steps (off the training clock); stop when the wall budget is spent."""

    order = 40

    def __init__(self, test_data, every: int, budget_s: float):
        self.test_data, self.every, self.budget_s = test_data, every, budget_s
        self.points: list[dict] = []

    def before_fit(self) -> None:
        synchronize(self.learner.device)
        self.start = self.train_start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.train_seconds = 0.0

    def after_step(self) -> None:
        lrn = self.learner
        last = lrn.n_steps == lrn.epochs * len(lrn.train_data)
        over = time.perf_counter() - self.start > self.budget_s
        if lrn.n_steps % self.every and not (last or over):
            return
        synchronize(lrn.device)
        now = time.perf_counter()
        self.train_seconds += now - self.train_start
        acc = evaluate(lrn.model, self.test_data, mixed_precision=lrn.step.dtype is not None)["acc"]
        wall = time.perf_counter() - self.start
        self.points.append({"step": lrn.n_steps, "epoch": lrn.n_steps / len(lrn.train_data),
                            "train_s": self.train_seconds, "wall_s": wall, "test_acc": acc,
                            "cpu_s": time.process_time() - self.cpu_start})
        print(f"  step {lrn.n_steps:>5} (epoch {lrn.n_steps / len(lrn.train_data):4.2f}): test acc {acc:.4f}, "
              f"training {self.train_seconds:7.1f} s, wall {wall:7.1f} s", flush=True)
        if over:
            print(f"  wall-time budget of {self.budget_s:.0f} s spent: stopping after this evaluation")
            raise CancelFit
        self.train_start = time.perf_counter()


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=None, help="ResNet-9 width (default: 1.0 on GPU, 0.25 on CPU)")
    parser.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    parser.add_argument("--batch-size", type=int, default=RECIPE["batch_size"])
    parser.add_argument("--evals-per-epoch", type=int, default=4)
    parser.add_argument("--budget-s", type=float, default=660.0, help="stop after this much wall time (default 11 min)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.80, 0.85, 0.90])
    args = parser.parse_args()
    dev = setup(args)
    width = args.width if args.width is not None else (1.0 if dev.type != "cpu" else 0.25)

    train, test = cifar10_loaders(args.batch_size, root=args.data_dir, device=dev, seed=args.seed, channels_last=True)
    model = resnet9(width).to(dev, memory_format=torch.channels_last)
    every = max(1, len(train) // args.evals_per_epoch)
    probe = EvaluateAndBudget(test, every, args.budget_s)
    print(f"ResNet-9 width {width:g} ({count_parameters(model) / 1e6:.2f}M params), {train.num_samples:,} training and "
          f"{test.num_samples:,} test images, {args.epochs} epochs of batches of {args.batch_size} "
          f"(one-cycle over all {args.epochs * len(train)} steps), evaluation every {every} steps, "
          f"budget {args.budget_s:.0f} s of wall time")
    learner = recipe_learner(model, train, None, epochs=args.epochs, callbacks=[probe])
    learner.fit(args.epochs)

    pts = probe.points
    rows = []
    for threshold in args.thresholds:
        hit = next((p for p in pts if p["test_acc"] >= threshold), None)
        rows.append({"threshold": f"{threshold:.2f}",
                     "train_s": hit["train_s"] if hit else float("nan"), "wall_s": hit["wall_s"] if hit else float("nan"),
                     "epoch": f"{hit['epoch']:.2f}" if hit else "not reached"})
    print()
    print(format_table(rows, {"threshold": "test accuracy", "train_s": "training s (first reached)",
                              "wall_s": "wall s (with evaluations)", "epoch": "epoch"},
                       {"train_s": ",.1f", "wall_s": ",.1f"}))
    last = pts[-1] if pts else None
    if last:
        print(f"\nlast evaluation: test accuracy {last['test_acc']:.4f} at epoch {last['epoch']:.2f} "
              f"({last['train_s']:.1f} s training, {last['wall_s']:.1f} s wall); best {max(p['test_acc'] for p in pts):.4f}")
        print(f"process CPU time {last['cpu_s']:.0f} s over {last['wall_s']:.0f} s of wall time "
              f"({torch.get_num_threads()} torch threads): a ratio well below the thread count means the CPU was shared")
    print(f"at the end: {load_line()}")


if __name__ == "__main__":
    main()
