"""Benchmark 2: FLOPs per training image, and the FLOP rate training achieves against the device's matmul rate.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (matrix multiplications and
convolutions, forward and backward, 2 FLOPs per multiply-accumulate); batch norm, ReLU, pooling
and the optimizer are not counted, so the achieved rate is a slight underestimate of the work
done. The limit is a large square matrix multiplication measured on the same device, in the
dtype the training runs in (bf16 under autocast on GPUs, fp32 on the CPU).

Usage: python benchmarks/flops.py [--device cuda] [--widths 1.0 0.25] [--steps 20]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import resnet34, vgg19

from common import base_parser, setup
from fasttrain.device import Timer, autocast_dtype
from fasttrain.costs import count_parameters
from fasttrain.resnet import resnet9
from fasttrain.speed import format_table, random_batches, training_throughput


def training_flops_per_image(model: torch.nn.Module, dev: torch.device, batch: int = 4) -> tuple[float, float]:
    """(forward FLOPs, forward+backward FLOPs) per 32x32 image, counted on a small batch."""
    x = torch.randn(batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    model.train()
    with FlopCounterMode(display=False) as fwd:
        loss = F.cross_entropy(model(x), y)
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    model.zero_grad(set_to_none=True)
    forward = fwd.get_total_flops() / batch
    return forward, forward + bwd.get_total_flops() / batch


def matmul_rate(dev: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """FLOP/s of an n x n by n x n matrix multiplication in `dtype` (best of `repeats`)."""
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        with Timer(dev) as t:
            a @ b
        best = min(best, t.seconds)
    return 2 * n ** 3 / best


def imagenet_forward_flops() -> list[dict]:
    """Forward FLOPs of VGG-19 and ResNet-34 on one 224x224 image (meta tensors: shapes only, no compute)."""
    rows = []
    for name, build in (("VGG-19", vgg19), ("ResNet-34", resnet34)):
        with torch.device("meta"):
            model, x = build(), torch.randn(1, 3, 224, 224)
        with FlopCounterMode(display=False) as counter:
            model(x)
        rows.append({"model": name, "gflops": counter.get_total_flops() / 1e9, "params": count_parameters(model) / 1e6})
    for row in rows:
        row["ratio"] = row["gflops"] / rows[0]["gflops"]
    return rows


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[1.0, 0.25])
    parser.add_argument("--batch-size", type=int, default=400)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 on GPU, 3 on CPU)")
    parser.add_argument("--matmul-size", type=int, default=None, help="matrix side (default: 8192 on GPU, 2048 on CPU)")
    args = parser.parse_args()
    dev = setup(args)
    on_gpu = dev.type != "cpu"
    steps = args.steps or (20 if on_gpu else 3)
    dtype = autocast_dtype(dev) or torch.float32
    n = args.matmul_size or (8192 if on_gpu else 2048)
    repeats = 10 if on_gpu else 5
    before = matmul_rate(dev, dtype, n, repeats)
    print(f"training: batch {args.batch_size}, random data on the device, channels_last, Adam, "
          f"autocast {'on (' + str(dtype).replace('torch.', '') + ')' if on_gpu else 'off'}, {steps} timed steps")

    rows = []
    for width in args.widths:
        torch.manual_seed(0)
        model = resnet9(width).to(dev, memory_format=torch.channels_last)
        fwd, train = training_flops_per_image(model, dev)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        rate = training_throughput(model, random_batches(args.batch_size, dev, channels_last=True), dev,
                                   steps=steps, warmup=max(1, steps // 4), optimizer=opt, mixed_precision=True)
        achieved = rate * train
        rows.append({"model": f"ResNet-9 width {width:g}", "fwd": fwd / 1e9, "train": train / 1e9, "rate": rate,
                     "achieved": achieved / 1e9})
    # The limit is the best matmul rate seen before and after the training timings: on a shared
    # machine the load changes from minute to minute, and a limit taken in a busy moment would
    # make the percentages meaningless.
    limit = max(before, matmul_rate(dev, dtype, n, repeats))
    print(f"matmul limit: {limit / 1e9:,.1f} GFLOP/s ({n}x{n} {str(dtype).replace('torch.', '')} matmul, "
          f"best of {2 * repeats} runs before and after the training timings)\n")
    for row in rows:
        row["percent"] = 100 * row["achieved"] * 1e9 / limit
    print(format_table(rows, {"model": "model", "fwd": "GFLOPs/img forward", "train": "GFLOPs/img training",
                              "rate": "img/s", "achieved": "achieved GFLOP/s", "percent": "% of matmul rate"},
                       {"fwd": ".3f", "train": ".3f", "achieved": ",.1f", "percent": ".1f"}))
    print("\nImageNet models, one 224x224 image, forward (He et al. 2016 give 19.6 and 3.6 billion multiply-adds):")
    print(format_table(imagenet_forward_flops(), {"model": "model", "gflops": "GFLOPs", "params": "M params",
                                                  "ratio": "vs VGG-19"},
                       {"gflops": ".2f", "params": ".1f", "ratio": ".1%"}))


if __name__ == "__main__":
    main()
