"""Benchmark 1: training throughput of the library's data path against the tutorial's DataLoader.

Both paths train the same model (ResNet-9 at each width asked for, channels_last, autocast where
the device has a low-precision dtype, Adam) on the same device with the same batch size and the
same augmentation (random crop with 4 pixels of reflect padding, random flip):

- fast: the 50,000 uint8 images live on the device; crop, flip and normalisation are batched
  tensor ops there (`fasttrain.batches.cifar10_loaders`); no worker processes;
- dataloader: the PyTorch tutorial's way, a torchvision dataset of PIL images with
  `transforms.RandomCrop/RandomHorizontalFlip/ToTensor/Normalize` applied image by image in
  `DataLoader` workers, each batch copied to the device.

Usage: python benchmarks/throughput.py [--device cuda] [--widths 1.0 0.25] [--steps 20]
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision import transforms

from common import base_parser, load_train_on_device, setup
from fasttrain.batches import cifar10_loaders
from fasttrain.datasets import CIFAR10_MEAN, CIFAR10_STD
from fasttrain.costs import count_parameters
from fasttrain.resnet import resnet9
from fasttrain.speed import format_table, training_throughput


class PILCIFAR10(torch.utils.data.Dataset):
    """CIFAR-10 as torchvision's dataset serves it: one PIL image at a time, through `transform`."""

    def __init__(self, images_uint8: torch.Tensor, labels: torch.Tensor, transform):
        self.images = images_uint8.cpu().permute(0, 2, 3, 1).contiguous().numpy()  # NHWC for PIL
        self.labels = labels.cpu().tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def tutorial_loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int, workers: int,
                    dev: torch.device):
    """The tutorial's data path: PIL transforms in DataLoader workers, each batch moved to the device."""
    tf = transforms.Compose([
        transforms.RandomCrop(32, padding=4, padding_mode="reflect"),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD),
    ])
    loader = torch.utils.data.DataLoader(PILCIFAR10(images, labels, tf), batch_size=batch_size, shuffle=True,
                                         num_workers=workers, pin_memory=dev.type == "cuda", drop_last=True,
                                         persistent_workers=workers > 0)

    def batches():
        for xb, yb in loader:
            yield (xb.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last),
                   yb.to(dev, non_blocking=True))

    class Loader:
        def __iter__(self):
            return batches()

    return Loader()


def measure(width: float, batches, dev: torch.device, steps: int, warmup: int) -> float:
    """Images/s of training steps of a fresh ResNet-9 of `width` on `batches`."""
    torch.manual_seed(0)
    model = resnet9(width).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    return training_throughput(model, batches, dev, steps=steps, warmup=warmup, optimizer=opt,
                               mixed_precision=True)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[1.0, 0.25])
    parser.add_argument("--batch-size", type=int, default=400)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default: 20 on GPU, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5 on GPU, 1 on CPU)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the baseline (the tutorial uses 2)")
    args = parser.parse_args()
    dev = setup(args)
    on_gpu = dev.type != "cpu"
    steps = args.steps or (20 if on_gpu else 3)
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)

    x, y, seconds = load_train_on_device(dev, args.data_dir)
    print(f"cached CIFAR-10 training set ({len(x):,} uint8 images, {x.numel() / 2**20:.0f} MiB) loaded from disk "
          f"onto {dev.type} in {seconds:.2f} s")
    fast, _ = cifar10_loaders(args.batch_size, root=args.data_dir, device=dev, channels_last=True, seed=args.seed)
    slow = tutorial_loader(x, y, args.batch_size, args.workers, dev)
    print(f"batch {args.batch_size}, {warmup} warm-up + {steps} timed steps per row, Adam, channels_last, "
          f"autocast {'on' if on_gpu else 'off (none on CPU)'}; baseline DataLoader with {args.workers} workers\n")

    rows = []
    for width in args.widths:
        params = count_parameters(resnet9(width))
        fast_rate = measure(width, fast, dev, steps, warmup)
        slow_rate = measure(width, slow, dev, steps, warmup)
        rows.append({"model": f"ResNet-9 width {width:g} ({params / 1e6:.2f}M params)",
                     "fast": fast_rate, "slow": slow_rate, "ratio": fast_rate / slow_rate})
        print(f"  measured width {width:g}", flush=True)
    print()
    print(format_table(rows, {"model": "model", "fast": "device data path (img/s)",
                              "slow": "DataLoader + PIL (img/s)", "ratio": "ratio"},
                       {"ratio": ".2f"}))


if __name__ == "__main__":
    main()
