"""Unit tests of fasttrain.datasets and fasttrain.batches: CIFAR-10 sources and cache, subsets, loaders, augmentation, digits."""

from __future__ import annotations

import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fasttrain import datasets as data
from fasttrain.batches import DeviceLoader, augment, cifar10_loaders, normalize, random_crop, random_flip
from fasttrain.datasets import (CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, ENV_VAR, CacheCorruptWarning,
                                CacheStaleWarning, balanced_subset, cache_dir, cache_path, data_root, load_cifar10,
                                load_digits)


def _fake_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n random uint8 NHWC images with labels cycling through the 10 classes, shuffled."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.permutation(np.arange(n) % 10).astype(np.int64)
    return images, labels


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Keep every cache and default root inside tmp_path, whatever the caller's environment says."""
    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.fixture
def npz_root(tmp_path) -> Path:
    """A data root in the layout of /work/shared/data/cifar10 with 200 train and 50 test images."""
    root = tmp_path / "cifar_npz"
    root.mkdir()
    for split, n, seed in (("train", 200, 1), ("test", 50, 2)):
        images, labels = _fake_split(n, seed)
        np.savez(root / f"{split}.npz", images=images, labels=labels)
    return root


def _source(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(root / f"{split}.npz") as d:
        return torch.from_numpy(d["images"]).permute(0, 3, 1, 2), torch.from_numpy(d["labels"])


# --- where things live -----------------------------------------------------------------------

def test_data_root_prefers_argument_then_env_var_then_home(tmp_path, monkeypatch):
    assert data_root() == tmp_path / "home" / ".cache" / "fasttrain" / "data"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "from_env"))
    assert data_root() == tmp_path / "from_env"
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data_root(str(tmp_path / "arg")) == tmp_path / "arg"


def test_cifar10_constants_have_the_original_class_order():
    assert CIFAR10_CLASSES == ("airplane", "automobile", "bird", "cat", "deer",
                               "dog", "frog", "horse", "ship", "truck")
    assert len(CIFAR10_MEAN) == len(CIFAR10_STD) == 3
    assert all(0 < m < 1 for m in CIFAR10_MEAN) and all(0 < s < 1 for s in CIFAR10_STD)


# --- loading CIFAR-10 ------------------------------------------------------------------------

def test_npz_root_gives_uint8_nchw_images_and_int64_labels(npz_root):
    for split, n in (("train", 200), ("test", 50)):
        images, labels = load_cifar10(split, root=npz_root, download=False)
        assert images.shape == (n, 3, 32, 32) and images.dtype == torch.uint8
        assert labels.shape == (n,) and labels.dtype == torch.int64
        src_images, src_labels = _source(npz_root, split)
        assert torch.equal(images, src_images) and torch.equal(labels, src_labels)
        assert images.is_contiguous()


def test_root_is_read_from_the_env_var(npz_root, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(npz_root))
    images, labels = load_cifar10("test", download=False)
    assert torch.equal(labels, _source(npz_root, "test")[1])


def test_cache_round_trip_equals_the_source(npz_root):
    first = load_cifar10("train", root=npz_root, download=False)
    cache = cache_path("train", npz_root)
    assert cache.is_file() and cache.parent == cache_dir(), "the cache goes to FASTTRAIN_CACHE, never into the data root"
    os.rename(npz_root / "train.npz", npz_root / "moved.npz")  # the second load can only come from the cache
    second = load_cifar10("train", root=npz_root, download=False)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_bytes(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2  # the images are about 99% of the file, so this lands in pixel data
    raw[middle:middle + 16] = bytes(255 - b for b in raw[middle:middle + 16])
    path.write_bytes(bytes(raw))


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a torch file at all")


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _wrong_checksum(path: Path) -> None:
    record = torch.load(path, weights_only=True)
    record["checksum"] += 1
    torch.save(record, path)


def _wrong_shape(path: Path) -> None:
    record = torch.load(path, weights_only=True)
    record["images"] = record["images"][:-1].clone()
    torch.save(record, path)


@pytest.mark.parametrize("damage", [_truncate, _flip_bytes, _garbage, _empty, _wrong_checksum, _wrong_shape])
def test_damaged_cache_is_detected_reported_and_rebuilt(npz_root, damage):
    expected = _source(npz_root, "train")
    load_cifar10("train", root=npz_root, download=False)
    cache = cache_path("train", npz_root)
    damage(cache)
    with pytest.warns(CacheCorruptWarning, match="(?s)corrupt.*Rebuilding"):
        images, labels = load_cifar10("train", root=npz_root, download=False)
    assert torch.equal(images, expected[0]) and torch.equal(labels, expected[1])
    rebuilt = data._read_cache(cache)  # raises if the rebuilt file is not valid
    assert torch.equal(rebuilt[0], expected[0])


def test_cache_is_rebuilt_when_its_source_changes(npz_root):
    load_cifar10("test", root=npz_root, download=False)
    images, labels = _fake_split(50, 99)
    np.savez(npz_root / "test.npz", images=images, labels=labels)
    with pytest.warns(CacheStaleWarning, match="changed"):
        new_images, new_labels = load_cifar10("test", root=npz_root, download=False)
    assert torch.equal(new_images, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert torch.equal(new_labels, torch.from_numpy(labels))


def test_read_only_root_puts_the_cache_in_fasttrain_cache(npz_root, tmp_path):
    os.chmod(npz_root, 0o555)
    try:
        images, _ = load_cifar10("test", root=npz_root, download=False)
        cache = cache_path("test", npz_root)
        assert cache.parent == tmp_path / "cache" and cache.is_file()
        assert sorted(p.name for p in npz_root.iterdir()) == ["test.npz", "train.npz"]
        again, _ = load_cifar10("test", root=npz_root, download=False)
        assert torch.equal(images, again)
    finally:
        os.chmod(npz_root, 0o755)


def test_unwritable_cache_warns_and_still_returns_the_data(npz_root, monkeypatch):
    def disk_full(*args, **kwargs):
        raise RuntimeError("PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.warns(UserWarning, match="Could not write the CIFAR-10 cache"):
        images, labels = load_cifar10("test", root=npz_root, download=False)
    assert torch.equal(labels, _source(npz_root, "test")[1])
    assert not cache_path("test", npz_root).exists()
    assert sorted(p.name for p in npz_root.iterdir()) == ["test.npz", "train.npz"], "no temporary file left behind"


def test_download_goes_to_fasttrain_cache_when_the_root_is_read_only(tmp_path, monkeypatch):
    images, labels = _fake_split(10, 6)

    class Downloaded:
        def __init__(self, root, train, download):
            self.data, self.targets = images, labels.tolist()

    calls = _fake_torchvision(monkeypatch, Downloaded)
    root = tmp_path / "readonly"
    root.mkdir()
    os.chmod(root, 0o555)
    try:
        load_cifar10("test", root=root, download=True)
    finally:
        os.chmod(root, 0o755)
    assert calls == [(str(tmp_path / "cache" / "cifar10"), False, True)]
    assert list(root.iterdir()) == []


def test_torchvision_folder_layout_is_read(tmp_path):
    root = tmp_path / "tv"
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    expected = []
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        images, labels = _fake_split(20, 10 + i)
        chw_rows = images.transpose(0, 3, 1, 2).reshape(20, -1)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": chw_rows, "labels": labels.tolist()}, f)
        expected.append((images, labels))
    train_images, train_labels = load_cifar10("train", root=root, download=False)
    assert train_images.shape == (100, 3, 32, 32)
    want = torch.from_numpy(np.concatenate([e[0] for e in expected[:5]])).permute(0, 3, 1, 2)
    assert torch.equal(train_images, want)
    assert train_labels.tolist() == np.concatenate([e[1] for e in expected[:5]]).tolist()
    test_images, _ = load_cifar10("test", root=root, download=False)
    assert torch.equal(test_images, torch.from_numpy(expected[5][0]).permute(0, 3, 1, 2))


def test_missing_root_without_download_raises_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError) as info:
        load_cifar10("train", root=tmp_path / "nowhere", download=False)
    message = str(info.value)
    assert ENV_VAR in message and "root" in message and "train.npz" in message
    assert "cifar-10-batches-py" in message and "download=True" in message and "download=False" in message


def _fake_torchvision(monkeypatch, cifar_class) -> list:
    """Install a stand-in torchvision.datasets.CIFAR10 and return the list its calls are recorded in."""
    calls = []
    module = types.ModuleType("torchvision.datasets")

    def factory(root, train=True, download=False):
        calls.append((root, train, download))
        return cifar_class(root, train, download)

    module.CIFAR10 = factory
    package = types.ModuleType("torchvision")
    package.datasets = module
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", module)
    return calls


def test_failed_download_raises_the_clear_error_with_its_cause(tmp_path, monkeypatch):
    class Offline:
        def __init__(self, *args):
            raise OSError("Temporary failure in name resolution")

    calls = _fake_torchvision(monkeypatch, Offline)
    with pytest.raises(RuntimeError, match=f"(?s){ENV_VAR}.*download") as info:
        load_cifar10("test", root=tmp_path / "empty", download=True)
    assert "name resolution" in str(info.value)
    assert calls == [(str(tmp_path / "empty"), False, True)]


def test_download_is_used_and_cached_when_nothing_is_found(tmp_path, monkeypatch):
    images, labels = _fake_split(30, 5)

    class Downloaded:
        def __init__(self, root, train, download):
            self.data, self.targets = images, labels.tolist()

    calls = _fake_torchvision(monkeypatch, Downloaded)
    root = tmp_path / "fresh"
    got, got_labels = load_cifar10("train", root=root, download=True)
    assert calls == [(str(root), True, True)]
    assert torch.equal(got, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert cache_path("train", root).is_file()
    load_cifar10("train", root=root, download=True)
    assert len(calls) == 1, "the second load must come from the cache, not a new download"


def test_unknown_split_raises_value_error(npz_root):
    with pytest.raises(ValueError, match="split"):
        load_cifar10("valid", root=npz_root)


# --- balanced subsets ------------------------------------------------------------------------

def _labelled(n_per_class: int = 12, num_classes: int = 10):
    labels = torch.arange(num_classes).repeat(n_per_class)[torch.randperm(n_per_class * num_classes,
                                                                          generator=torch.Generator().manual_seed(3))]
    images = torch.arange(len(labels)).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).to(torch.uint8)
    return images, labels


def test_balanced_subset_takes_n_over_classes_from_each_class():
    images, labels = _labelled()
    sub_images, sub_labels = balanced_subset(images, labels, 50)
    assert torch.bincount(sub_labels, minlength=10).tolist() == [5] * 10
    picked = sub_images[:, 0, 0, 0].long()  # each image carries its own index
    assert len(set(picked.tolist())) == 50
    assert torch.equal(labels[picked], sub_labels)


def test_balanced_subset_is_deterministic_for_a_seed():
    images, labels = _labelled()
    a = balanced_subset(images, labels, 30, seed=4)
    b = balanced_subset(images, labels, 30, seed=4)
    c = balanced_subset(images, labels, 30, seed=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_balanced_subset_rejects_indivisible_n_and_short_classes():
    images, labels = _labelled()
    with pytest.raises(ValueError, match="multiple"):
        balanced_subset(images, labels, 55)
    with pytest.raises(ValueError, match="class"):
        balanced_subset(images, labels, 130)


# --- the device loader -----------------------------------------------------------------------

def test_device_loader_visits_every_sample_once_per_epoch_with_an_uneven_last_batch():
    x, y = torch.arange(103).float().view(-1, 1), torch.arange(103)
    loader = DeviceLoader(x, y, batch_size=10, seed=0)
    assert len(loader) == 11
    batches = list(loader)
    assert [len(yb) for _, yb in batches] == [10] * 10 + [3]
    seen = torch.cat([yb for _, yb in batches])
    assert sorted(seen.tolist()) == list(range(103))
    assert all(torch.equal(xb[:, 0].long(), yb) for xb, yb in batches)


def test_device_loader_reshuffles_between_epochs():
    x, y = torch.arange(100).view(-1, 1), torch.arange(100)
    loader = DeviceLoader(x, y, batch_size=32, seed=1)
    first = torch.cat([yb for _, yb in loader])
    second = torch.cat([yb for _, yb in loader])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(100))
    assert not torch.equal(first, second)
    assert first.tolist() != list(range(100))
    same_seed = torch.cat([yb for _, yb in DeviceLoader(x, y, batch_size=32, seed=1)])
    assert torch.equal(first, same_seed)


def test_device_loader_drop_last_keeps_only_full_batches():
    x, y = torch.arange(103).view(-1, 1), torch.arange(103)
    loader = DeviceLoader(x, y, batch_size=10, drop_last=True, seed=2)
    assert len(loader) == 10
    batches = [yb for _, yb in loader]
    assert [len(b) for b in batches] == [10] * 10
    assert len(set(torch.cat(batches).tolist())) == 100


def test_device_loader_without_shuffle_keeps_order_and_applies_transform():
    x, y = torch.arange(25).view(-1, 1), torch.arange(25)
    loader = DeviceLoader(x, y, batch_size=8, shuffle=False, transform=lambda xb: xb * 2)
    xs, ys = zip(*loader)
    assert torch.cat(ys).tolist() == list(range(25))
    assert torch.cat(xs)[:, 0].tolist() == [2 * i for i in range(25)]


def test_device_loader_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="same number"):
        DeviceLoader(torch.zeros(5, 1), torch.zeros(4), batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        DeviceLoader(torch.zeros(5, 1), torch.zeros(5), batch_size=0)


# --- augmentation and normalisation ----------------------------------------------------------

def _images(dtype=torch.uint8, n=16):
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return x if dtype == torch.uint8 else x.to(dtype) / 255


def _window_offsets(out: torch.Tensor, padded: torch.Tensor, size: int) -> list[tuple[int, int]]:
    """For each image, the (dy, dx) where `out` is a window of `padded` (asserting there is one)."""
    offsets = []
    span = padded.shape[-1] - size + 1
    for i in range(len(out)):
        hits = [(dy, dx) for dy in range(span) for dx in range(span)
                if torch.equal(padded[i, :, dy:dy + size, dx:dx + size], out[i])]
        assert hits, f"image {i} is not a window of its padded image"
        offsets.append(hits[0])
    return offsets


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("mode", ["reflect", "replicate", "constant"])
def test_random_crop_outputs_are_windows_of_the_padded_image(dtype, mode):
    x = _images(dtype)
    out = random_crop(x, padding=4, mode=mode, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == dtype
    padded = F.pad(x.float(), (4, 4, 4, 4), mode=mode).to(dtype)
    offsets = _window_offsets(out, padded, 32)
    assert len(set(offsets)) > 1, "every image got the same offset: offsets must be drawn per image"


def test_random_crop_is_reproducible_with_a_generator_and_zero_padding_is_identity():
    x = _images()
    a = random_crop(x, generator=torch.Generator().manual_seed(7))
    b = random_crop(x, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(random_crop(x, padding=0), x)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_random_flip_mirrors_some_rows_and_flipping_twice_is_identity(dtype):
    x = _images(dtype, n=64)
    once = random_flip(x, generator=torch.Generator().manual_seed(3))
    flipped = torch.tensor([torch.equal(once[i], x[i].flip(-1)) for i in range(len(x))])
    kept = torch.tensor([torch.equal(once[i], x[i]) for i in range(len(x))])
    assert bool((flipped | kept).all()), "each image must be either unchanged or mirrored left-right"
    assert 0 < int(flipped.sum()) < len(x)
    twice = random_flip(once, generator=torch.Generator().manual_seed(3))  # the same draws flip the same rows back
    assert torch.equal(twice, x)


def test_augment_keeps_shape_dtype_and_pixel_values():
    x = _images()
    out = augment(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8 and out.device == x.device
    assert not torch.equal(out, x)


def test_normalize_gives_zero_mean_unit_std_with_the_data_statistics():
    x = _images(n=64)
    mean = (x.double() / 255).mean((0, 2, 3)).tolist()
    std = (x.double() / 255).std((0, 2, 3), unbiased=False).tolist()
    out = normalize(x, mean, std)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert out.mean((0, 2, 3)).abs().max() < 1e-4
    assert (out.std((0, 2, 3), unbiased=False) - 1).abs().max() < 1e-4
    assert normalize(x, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert torch.allclose(normalize(x.float() / 255), normalize(x), atol=1e-5)


# --- convenience loaders and digits ----------------------------------------------------------

def test_cifar10_loaders_give_balanced_normalised_batches(npz_root):
    train, test = cifar10_loaders(32, root=npz_root, n_train=100, n_test=50, channels_last=True)
    assert len(train) == 4 and len(test) == 2
    train_labels = torch.cat([yb for _, yb in train])
    assert torch.bincount(train_labels, minlength=10).tolist() == [10] * 10
    xb, yb = next(iter(test))
    assert xb.shape == (32, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert xb.is_contiguous(memory_format=torch.channels_last)
    src = _source(npz_root, "test")[0]
    assert torch.allclose(xb, normalize(src[:32]))  # test set: not shuffled, not augmented
    assert -3 < float(xb.mean()) < 3


def test_load_digits_gives_scaled_float_features_and_a_stratified_split():
    x_tr, y_tr, x_te, y_te = load_digits(test_fraction=0.2, seed=0)
    assert x_tr.shape == (1437, 64) and x_te.shape == (360, 64)
    assert x_tr.dtype == x_te.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert float(x_tr.min()) == 0.0 and float(x_tr.max()) == 1.0 and float(x_te.max()) <= 1.0
    share_train = torch.bincount(y_tr, minlength=10) / len(y_tr)
    share_test = torch.bincount(y_te, minlength=10) / len(y_te)
    assert float((share_train - share_test).abs().max()) < 0.01
    again = load_digits(test_fraction=0.2, seed=0)
    assert torch.equal(again[0], x_tr) and torch.equal(again[3], y_te)
