"""Data sets: CIFAR-10 (found, downloaded or read from a checksummed cache) and scikit-learn's 8x8 digits.

CIFAR-10 is looked for, in order: a checksummed cache of uint8 tensors, the npz layout
(`train.npz` / `test.npz` with `images` uint8 NHWC and `labels`), torchvision's
`cifar-10-batches-py` folder, and last torchvision's checksummed download. The data root is
the `root` argument, else `$FASTTRAIN_DATA`, else `~/.cache/fasttrain/data`. The cache goes to
`$FASTTRAIN_CACHE` (default `~/.cache/fasttrain`), never into the data root: a shared copy of
the data stays untouched even where every folder is writable (as for root).
Batching and augmentation on the device are in `fasttrain.batches`.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import stat
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from .files import save_atomically

ENV_VAR = "FASTTRAIN_DATA"
CACHE_ENV_VAR = "FASTTRAIN_CACHE"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
# Per-channel mean and standard deviation over all pixels of the original 50,000 training images
# (torchvision's download), on the 0..1 scale. Not the often copied std (0.2023, 0.1994, 0.2010),
# which is smaller than the data's.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

SPLITS = ("train", "test")
CACHE_FORMAT = 1
_TORCHVISION_DIR = "cifar-10-batches-py"
_TORCHVISION_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


class CacheCorruptWarning(UserWarning):
    """A CIFAR-10 cache file failed its checks and is being rebuilt from the source."""


class CacheStaleWarning(UserWarning):
    """The source a CIFAR-10 cache was built from has changed since; the cache is being rebuilt."""


# ---------------------------------------------------------------------------------------------
# Where the data and the cache live
# ---------------------------------------------------------------------------------------------

def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: the argument, else $FASTTRAIN_DATA, else ~/.cache/fasttrain/data."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fasttrain" / "data"


def cache_dir() -> Path:
    """Where the course keeps what it computes (data caches, training checkpoints): $FASTTRAIN_CACHE, else ~/.cache/fasttrain."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fasttrain"


def _is_writable_dir(path: Path) -> bool:
    """True when `path` is (or can be made as) a directory meant to be written to.

    A directory with no write bit at all counts as read-only even for root, who could
    write there anyway: a shared, read-only data copy must not collect caches.
    """
    while not path.exists():
        if path.parent == path:
            return False
        path = path.parent
    if not path.is_dir():
        return False
    return bool(path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)) and os.access(path, os.W_OK)


def cache_path(split: str, root: str | os.PathLike | None = None) -> Path:
    """The cache file of a CIFAR-10 split for this data root, in `cache_dir()` (never in the data root itself)."""
    _check_split(split)
    root = data_root(root)
    tag = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:10]
    return cache_dir() / f"cifar10_{split}_uint8_{tag}.pt"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown CIFAR-10 split {split!r}: use split='train' (50,000 images) or 'test' (10,000).")


# ---------------------------------------------------------------------------------------------
# The cache: uint8 tensors plus a recorded shape and checksum
# ---------------------------------------------------------------------------------------------

def _checksum(images: torch.Tensor, labels: torch.Tensor) -> int:
    """CRC-32 of the image bytes followed by the label bytes (about 0.04 s for the training set)."""
    crc = zlib.crc32(images.contiguous().numpy())
    return zlib.crc32(labels.contiguous().numpy(), crc)


def _stamp(source: str, split: str) -> list[int]:
    """Sizes and modification times of the source files, to notice when a source changes under its cache."""
    path = Path(source)
    files = [path / name for name in _TORCHVISION_FILES[split]] if path.is_dir() else [path]
    stamp = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            return []
        stamp += [st.st_size, st.st_mtime_ns]
    return stamp


def _write_cache(path: Path, images: torch.Tensor, labels: torch.Tensor, source: str, split: str) -> None:
    """Write the cache atomically (temporary file, then rename), so an interrupted write leaves no half file."""
    record = {"format": CACHE_FORMAT, "images": images, "labels": labels,
              "shape": tuple(images.shape), "checksum": _checksum(images, labels),
              "source": source, "stamp": _stamp(source, split)}
    save_atomically(record, path, mode=0o644)  # a data cache may be read by everyone


def _read_cache(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Load a cache file and verify it: (images, labels, record); raise ValueError saying what is wrong."""
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, garbage bytes, unpickling errors: all mean "corrupt"
        first_line = (str(exc).strip().splitlines() or [""])[0][:120]
        raise ValueError(f"it cannot be read ({type(exc).__name__}: {first_line})") from exc
    if not isinstance(record, dict) or record.get("format") != CACHE_FORMAT:
        raise ValueError("it is not a fasttrain CIFAR-10 cache of the current format")
    images, labels = record.get("images"), record.get("labels")
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ValueError("it lacks the images or labels tensor")
    if images.dtype != torch.uint8 or labels.dtype != torch.int64:
        raise ValueError(f"its dtypes are {images.dtype}/{labels.dtype}, not uint8/int64")
    shape = tuple(images.shape)
    if shape != tuple(record.get("shape", ())) or shape[1:] != (3, 32, 32) or labels.shape != (shape[0],):
        raise ValueError(f"its shapes {shape} and {tuple(labels.shape)} do not match the recorded {record.get('shape')}")
    if _checksum(images, labels) != record.get("checksum"):
        raise ValueError("its checksum does not match the recorded one")
    return images, labels, record


# ---------------------------------------------------------------------------------------------
# The sources: npz, torchvision's folder, torchvision's download
# ---------------------------------------------------------------------------------------------

def _from_nhwc(images: np.ndarray, labels, where: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC array and labels -> (uint8 NCHW tensor, int64 tensor), checking the layout."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise ValueError(f"{where}: expected uint8 images of shape [N, 32, 32, 3], got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{where}: expected {images.shape[0]} labels, got shape {labels.shape}")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(labels.astype(np.int64))
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(CIFAR10_CLASSES)):
        raise ValueError(f"{where}: labels must lie in 0..9, got {int(y.min())}..{int(y.max())}")
    return x, y


def _read_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(path) as data:
        missing = {"images", "labels"} - set(data.files)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)} (has {data.files})")
        return _from_nhwc(data["images"], data["labels"], path)


def _read_torchvision_folder(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read torchvision's `cifar-10-batches-py` pickles (rows of 3072 bytes in CHW order)."""
    images, labels = [], []
    for name in _TORCHVISION_FILES[split]:
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch["labels"] if "labels" in batch else batch["fine_labels"])
    nhwc = np.concatenate(images).transpose(0, 2, 3, 1)
    return _from_nhwc(nhwc, labels, folder)


def _download(split: str, into: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's checksummed download of CIFAR-10 into `into`."""
    from torchvision.datasets import CIFAR10

    into.mkdir(parents=True, exist_ok=True)
    dataset = CIFAR10(str(into), train=(split == "train"), download=True)
    return _from_nhwc(dataset.data, dataset.targets, into)


def _load_from_source(split: str, root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Find the split in the root (npz, then torchvision's folder), else download it; say where it came from."""
    fallback = cache_dir() / "cifar10"
    looked = []
    for base in dict.fromkeys([root, fallback]):
        npz = base / f"{split}.npz"
        looked.append(str(npz))
        if npz.is_file():
            x, y = _read_npz(npz)
            return x, y, str(npz)
        folder = base / _TORCHVISION_DIR
        looked.append(str(folder))
        if all((folder / name).is_file() for name in _TORCHVISION_FILES[split]):
            x, y = _read_torchvision_folder(folder, split)
            return x, y, str(folder)
    into = root if _is_writable_dir(root) else fallback
    why = "download=False was passed"
    if download:
        try:
            x, y = _download(split, into)
            return x, y, str(into / _TORCHVISION_DIR)
        except Exception as exc:  # offline, DNS, bad checksum: all end in the same advice
            why = f"the download into {into} failed ({type(exc).__name__}: {exc})"
    raise RuntimeError(
        f"CIFAR-10 ({split}) was not found and {why}.\n"
        f"Looked for: {', '.join(looked)} (and a cache file {cache_path(split, root)}).\n"
        f"Fix it in one of these ways:\n"
        f"  * point the data root at a folder that holds train.npz/test.npz (arrays `images` uint8 NHWC "
        f"and `labels`) or torchvision's {_TORCHVISION_DIR}/: set the environment variable {ENV_VAR}=/path "
        f"or pass the `root` argument (for example load_cifar10(root='/work/shared/data/cifar10'));\n"
        f"  * or, with internet access, run the download step once: "
        f"load_cifar10({split!r}, root={str(root)!r}, download=True) "
        f"(torchvision.datasets.CIFAR10(root, download=True), about 170 MB, checksummed)."
    )


# ---------------------------------------------------------------------------------------------
# Public loaders
# ---------------------------------------------------------------------------------------------

def load_cifar10(split: str = "train", root: str | os.PathLike | None = None,
                 device: torch.device | str = "cpu", download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 as (uint8 images [N,3,32,32], int64 labels [N]) on `device`, cached after the first load."""
    _check_split(split)
    root = data_root(root)
    cache = cache_path(split, root)
    if cache.exists():
        try:
            images, labels, record = _read_cache(cache)
        except ValueError as problem:
            warnings.warn(f"The CIFAR-10 cache {cache} is corrupt: {problem}. Rebuilding it from the source.",
                          CacheCorruptWarning, stacklevel=2)
            cache.unlink(missing_ok=True)
        else:
            source = str(record.get("source", ""))
            current = _stamp(source, split) if source else []
            if not current or current == record.get("stamp"):  # unchanged, or the source is gone: trust the cache
                return images.to(device), labels.to(device)
            warnings.warn(f"The CIFAR-10 cache {cache} was built from {source}, which has changed since. "
                          f"Rebuilding it.", CacheStaleWarning, stacklevel=2)
    images, labels, source = _load_from_source(split, root, download)
    try:
        _write_cache(cache, images, labels, source, split)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
        warnings.warn(f"Could not write the CIFAR-10 cache {cache} ({exc}); loading will stay slow. "
                      f"Set {CACHE_ENV_VAR} to a writable folder.", stacklevel=2)
    return images.to(device), labels.to(device)


def load_digits(device: torch.device | str = "cpu", test_fraction: float = 0.2,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as float32 [N,64] in 0..1 with int64 labels, split stratified: (x_tr, y_tr, x_te, y_te)."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    digits = sk_load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    return tuple(torch.from_numpy(a).to(device) for a in (x_tr, y_tr, x_te, y_te))


def balanced_subset(images: torch.Tensor, labels: torch.Tensor, n: int,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` samples, n/num_classes from each class, chosen at random (the same for the same seed), in source order."""
    if len(images) != len(labels):
        raise ValueError(f"images ({len(images)}) and labels ({len(labels)}) differ in length")
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    if n <= 0 or num_classes == 0 or n % num_classes:
        raise ValueError(f"n={n} must be a positive multiple of the number of classes ({num_classes}), "
                         f"for example {max(num_classes, 1) * max(1, n // max(num_classes, 1))}")
    per_class = n // num_classes
    cpu_labels = labels.cpu()
    counts = torch.bincount(cpu_labels, minlength=num_classes)
    short = [(c, int(k)) for c, k in enumerate(counts) if k < per_class]
    if short:
        raise ValueError(f"balanced_subset needs {per_class} samples per class but these classes have fewer: "
                         + ", ".join(f"class {c}: {k}" for c, k in short) + "; ask for a smaller n")
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        members = torch.nonzero(cpu_labels == c).flatten()
        chosen.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    index = torch.cat(chosen).sort().values.to(labels.device)
    return images[index.to(images.device)], labels[index]
