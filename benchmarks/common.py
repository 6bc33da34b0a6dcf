"""What the benchmark scripts share: command-line basics, the device line, and the CIFAR-10 data on the device."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform

import torch

from fasttrain import __version__
from fasttrain.datasets import load_cifar10
from fasttrain.device import Timer, device_name, get_device


def base_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes (device, CPU threads, seed)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice); the course machines use 2")
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 root (default: $FASTTRAIN_DATA)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def setup(args: argparse.Namespace) -> torch.device:
    """Apply the thread count and seed, pick the device, and print the header naming it."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dev = get_device(args.device, verbose=False)
    print(f"device: {device_name(dev)} | torch {torch.__version__} | fasttrain {__version__} | "
          f"python {platform.python_version()} | {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(load_line())
    return dev


def load_line() -> str:
    """The machine's load average against its core count: other jobs on a shared CPU slow every number."""
    if not hasattr(os, "getloadavg"):
        return "load average: not available on this system"
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


def load_train_on_device(dev: torch.device, data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The 50,000 CIFAR-10 training images (uint8) and labels on the device, and the seconds the load took.

    The first call builds the cache; the time returned is that of a second, cached load, which is
    what every training run after the first one pays.
    """
    load_cifar10("train", data_dir, "cpu")  # build the cache if it is missing
    with Timer(dev) as t:
        x, y = load_cifar10("train", data_dir, dev)
    return x, y, t.seconds
