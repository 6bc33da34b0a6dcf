"""fasttrain.distributed and the data-parallel Learner: sharding, all-reduced metrics, rank-0 writes, resume, under torchrun.

One torchrun job (2 processes, gloo, on the CPU) runs this file as its script (the `__main__`
block at the end) and trains the same small models as the tests do in one process. The
trainings run in float64: two computations that are the same up to rounding would otherwise
drift apart in float32 within a few dozen steps (a max-pool or ReLU tie broken the other way),
and the tests state their tolerances for float64.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fasttrain import distributed, results, runtime, train
from fasttrain.batches import DeviceLoader, Preprocess
from fasttrain.board import LiveBoard
from fasttrain.train import CancelFit, Callback, Checkpoint, Learner, Resume, evaluate

TOLERANCE = 1e-10  # largest weight difference allowed between 2 processes and 1 (float64)
METRIC_TOLERANCE = 1e-6  # the Learner sums its losses and counts in float32
GLOBAL_BATCH = 16


# --- what the torchrun job and the single-process references both train ---------------------------------------

def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (n,), generator=g))


def net(norm="sync", seed=0):
    """A conv net with BatchNorm (as SyncBatchNorm2d, plain BatchNorm2d, or per-device BatchNorm over 2 devices)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10)).double()
    if norm == "sync":
        distributed.convert_sync_batchnorm(model)
    elif norm == "per_device_2":
        distributed.convert_per_device_batchnorm(model, 2)
    return model


def loaders(augment=False, seed=0):
    x, y = data()
    world = distributed.world_size()
    gen = torch.Generator().manual_seed(seed + 1 + 1000 * distributed.rank())
    tr = DeviceLoader(x, y, GLOBAL_BATCH // world, seed=seed, transform=Preprocess(augment, torch.float64, generator=gen))
    va = DeviceLoader(x[:31], y[:31], 8, shuffle=False, transform=Preprocess(False, torch.float64))  # 16 + 15 shards
    return tr, va


def fit(norm="sync", epochs=3, callbacks=(), augment=False):
    tr, va = loaders(augment)
    model = net(norm)
    learner = Learner(model, tr, va, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), callbacks=callbacks)
    learner.fit(epochs)
    return learner


def weights(learner):
    return {k: v.detach().clone() for k, v in distributed.unwrap(learner.model).state_dict().items()}


class InterruptAfter(Callback):
    """Stop the fit after epoch `n` (after Resume has saved it): an interruption."""

    order = 200

    def __init__(self, n):
        self.n = n

    def after_epoch(self):
        if self.learner.epoch + 1 == self.n:
            raise CancelFit


def worker(out: Path) -> None:
    """What each torchrun process does: train, resume, write through every writer, and report what it did."""
    distributed.init("gloo", "cpu")
    rank = distributed.rank()
    mine = out / f"rank{rank}"
    mine.mkdir(parents=True, exist_ok=True)
    saves = []
    original_save, original_record = train.save_atomically, results.save_record
    train.save_atomically = lambda obj, path: (saves.append(Path(path).name), original_save(obj, path))[1]
    results.save_record = lambda record, folder: (saves.append("record"), original_record(record, folder))[1]
    report = {"rank": rank, "world": distributed.world_size()}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run = runtime.start("08_many_gpus", profile="smoke", device="cpu", seed=0, results_dir=mine / "results")
        board = LiveBoard(notebook=False)
        learner = fit("sync", callbacks=[board, Checkpoint("valid_acc", path=mine / "best.pt")])
        report["sync"] = {"weights": weights(learner), "history": learner.history,
                          "wrapped": distributed.is_wrapped(learner.model), "len": len(learner.train_data),
                          "num_samples": learner.train_data.num_samples}
        report["per_device"] = {"weights": weights(fit("batch"))}
        report["evaluate"] = evaluate(learner.model, loaders()[1])
        shared = out / "resume.pt"
        uninterrupted = fit("sync", epochs=3, augment=True, callbacks=[Resume(out / "whole.pt")])
        fit("sync", epochs=3, augment=True, callbacks=[Resume(shared), InterruptAfter(2)])
        resumed = fit("sync", epochs=3, augment=True, callbacks=[Resume(shared)])
        report["resume"] = {"uninterrupted": weights(uninterrupted), "resumed": weights(resumed),
                            "history": resumed.history}
        for t in results.targets_for("08_many_gpus", "smoke").values():  # a record that passes, to see who writes it
            run.metric(t.metric, t.target)
        run.finish()
    report["printed"] = printed.getvalue()
    report["saves"] = saves
    torch.save(report, out / f"report{rank}.pt")
    distributed.cleanup()


# --- without a process group: the library is the single-process one ---------------------------------------------

def test_one_process_without_a_group_is_untouched():
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main()
    model = nn.Linear(2, 2)
    assert distributed.wrap(model) is model and distributed.unwrap(model) is model
    loader = DeviceLoader(torch.zeros(10, 2), torch.zeros(10, dtype=torch.long), 4, seed=0)
    assert len(loader) == 3 and loader.num_samples == 10
    assert distributed.all_reduce_sum([1.5, torch.tensor(2)]) == [1.5, 2.0]
    assert distributed.gather_objects("x") == ["x"]
    x = torch.randn(6, 3, 4, 4)
    for layer in (distributed.SyncBatchNorm2d(3), distributed.PerDeviceBatchNorm2d(3, devices=1)):
        assert torch.allclose(layer(x), nn.BatchNorm2d(3)(x), atol=1e-6)


class _World:
    """Pretend to be `rank` of `world` processes (for the sharding logic alone)."""

    def __init__(self, monkeypatch, world):
        self.monkeypatch, self.world = monkeypatch, world

    def as_rank(self, rank):
        self.monkeypatch.setattr(distributed, "world_size", lambda: self.world)
        self.monkeypatch.setattr(distributed, "rank", lambda: rank)


def test_the_shards_of_one_step_are_one_batch_of_a_single_process(monkeypatch):
    x, y = torch.arange(24).float().view(24, 1), torch.arange(24)
    single = [yb.sort().values for _, yb in DeviceLoader(x, y, 6, seed=3)]
    world = _World(monkeypatch, 3)
    per_rank = []
    for r in range(3):
        world.as_rank(r)
        per_rank.append([yb for _, yb in DeviceLoader(x, y, 2, seed=3)])
    for step, batch in enumerate(single):
        together = torch.cat([per_rank[r][step] for r in range(3)]).sort().values
        assert torch.equal(together, batch), f"step {step}: the 3 shards are not the single process's batch"


def test_a_shuffled_loader_pads_its_shards_to_equal_length_and_an_evaluation_loader_shards_exactly(monkeypatch):
    x, y = torch.zeros(11, 1), torch.arange(11)
    world = _World(monkeypatch, 2)
    seen_train, seen_eval, steps = [], [], set()
    for r in range(2):
        world.as_rank(r)
        train_loader = DeviceLoader(x, y, 4, seed=0)
        eval_loader = DeviceLoader(x, y, 4, shuffle=False)
        steps.add(len(train_loader))
        assert train_loader.num_samples == 6 and eval_loader.num_samples == (6 if r == 0 else 5)
        seen_train += [int(v) for _, yb in train_loader for v in yb]
        seen_eval += [int(v) for _, yb in eval_loader for v in yb]
    assert steps == {2}, "every process must take as many training steps"
    assert sorted(set(seen_train)) == list(range(11)) and len(seen_train) == 12  # one sample repeated as padding
    assert sorted(seen_eval) == list(range(11)), "evaluation must see every sample exactly once"


def test_a_shuffled_loader_without_a_seed_is_refused_under_a_process_group(monkeypatch):
    _World(monkeypatch, 2).as_rank(1)
    with pytest.raises(ValueError, match="give the DeviceLoader a seed"):
        next(iter(DeviceLoader(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), 2)))
    assert len(list(DeviceLoader(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), 2, shard=False))) == 2


def test_per_device_batchnorm_normalises_each_strided_share_with_its_own_statistics():
    torch.manual_seed(0)
    x = torch.randn(12, 3, 5, 5)
    layer = distributed.PerDeviceBatchNorm2d(3, devices=3)
    out = layer(x)
    for r in range(3):
        assert torch.allclose(out[r::3], nn.BatchNorm2d(3)(x[r::3]), atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 3"):
        layer(torch.randn(4, 3, 5, 5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_per_device_batchnorm_takes_low_precision_activations_and_keeps_float32_statistics(dtype):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    layer = distributed.PerDeviceBatchNorm2d(3, devices=2)
    reference = distributed.PerDeviceBatchNorm2d(3, devices=2)
    out = layer(x.to(dtype))  # what a convolution hands on under autocast
    assert out.dtype == dtype and layer.running_mean.dtype == torch.float32
    assert torch.allclose(out.float(), reference(x), atol=0.05)
    assert torch.allclose(layer.running_mean, reference.running_mean, atol=1e-2)


def _sync_bn_in_low_precision(rank, world):
    torch.manual_seed(rank)
    x = torch.randn(4, 3, 4, 4)
    layer = distributed.SyncBatchNorm2d(3)
    out = layer(x.to(torch.bfloat16))
    out.float().sum().backward()
    everyone = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(everyone, x)
    whole = torch.cat(everyone)
    return (out.dtype, layer.running_mean.dtype, (layer.running_mean - 0.1 * whole.mean((0, 2, 3))).abs().max().item())


def test_sync_batchnorm_takes_bf16_activations_and_keeps_float32_statistics():
    for dtype, stats, gap in distributed.launch_local(_sync_bn_in_low_precision, 2):
        assert dtype == torch.bfloat16 and stats == torch.float32
        assert gap < 1e-2, "the running mean follows the global batch's mean"


def test_launch_local_returns_each_process_result_and_raises_what_a_process_raised():
    def ranks(rank, world):
        t = torch.tensor([float(rank)])
        dist.all_reduce(t)
        return rank, world, t.item()

    assert distributed.launch_local(ranks, 3) == [(0, 3, 3.0), (1, 3, 3.0), (2, 3, 3.0)]

    def fails(rank, world):
        if rank == 1:
            raise KeyError("rank one")
        return rank

    with pytest.raises(KeyError, match="rank one"):
        distributed.launch_local(fails, 2)


def test_launch_local_stops_a_collective_that_only_one_process_calls():
    def lonely(rank, world):
        if rank == 0:
            dist.all_reduce(torch.ones(1))
        return rank

    with pytest.raises(Exception):
        distributed.launch_local(lonely, 2, timeout_s=3)


# --- two processes under torchrun against one --------------------------------------------------------------------

@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun")
    env_cache = os.environ.get("FASTTRAIN_CACHE")
    os.environ["FASTTRAIN_CACHE"] = str(out / "cache")  # the job's checkpoints stay inside the test's folder
    try:
        distributed.run_torchrun(Path(__file__), 2, [out], timeout_s=240)
    finally:
        if env_cache is None:
            os.environ.pop("FASTTRAIN_CACHE", None)
        else:
            os.environ["FASTTRAIN_CACHE"] = env_cache
    return out, [torch.load(out / f"report{r}.pt", weights_only=False) for r in range(2)]


def _gap(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def _metric_gap(h1: list, h2: list) -> float:
    keys = ("train_loss", "train_acc", "valid_loss", "valid_acc")
    assert len(h1) == len(h2)
    return max(abs(r1[k] - r2[k]) for r1, r2 in zip(h1, h2) for k in keys)


def test_two_processes_train_the_weights_of_one_process_with_the_same_global_batch_and_seed(reports):
    _, (r0, r1) = reports
    assert r0["world"] == r1["world"] == 2 and r0["sync"]["wrapped"]
    assert r0["sync"]["len"] == 4 and r0["sync"]["num_samples"] == 32  # each process: half of 64, batches of 8
    single = weights(fit("sync"))  # SyncBatchNorm2d in one process is BatchNorm2d
    for r in (r0, r1):
        assert _gap(r["sync"]["weights"], single) < TOLERANCE


def test_batchnorm_per_process_equals_its_one_process_simulation_and_not_the_global_batch(reports):
    _, (r0, _) = reports
    assert _gap(r0["per_device"]["weights"], weights(fit("per_device_2"))) < TOLERANCE
    assert _gap(r0["per_device"]["weights"], weights(fit("batch"))) > 1e-3


def test_metrics_of_two_processes_equal_those_of_one_process(reports):
    _, (r0, r1) = reports
    single = fit("sync")
    assert _metric_gap(r0["sync"]["history"], single.history) < METRIC_TOLERANCE
    assert r0["sync"]["history"] == r1["sync"]["history"], "every process must report the same (all-reduced) metrics"
    ev = evaluate(single.model, loaders()[1])
    for r in (r0, r1):
        assert abs(r["evaluate"]["acc"] - ev["acc"]) < METRIC_TOLERANCE and abs(r["evaluate"]["loss"] - ev["loss"]) < METRIC_TOLERANCE


def test_only_rank_0_writes_checkpoints_resume_states_records_and_board_lines(reports):
    out, (r0, r1) = reports
    assert r1["saves"] == [] and r1["printed"] == "", f"rank 1 wrote {r1['saves']} and printed {r1['printed']!r}"
    assert "best.pt" in r0["saves"] and "resume.pt" in r0["saves"] and "record" in r0["saves"]
    assert "epoch 3" in r0["printed"] and "Results of 08_many_gpus" in r0["printed"]
    assert (out / "rank0" / "best.pt").is_file() and not (out / "rank1" / "best.pt").exists()
    assert list((out / "rank0" / "results").rglob("*.json")) and not (out / "rank1" / "results").exists()


def test_an_interrupted_training_resumes_under_two_processes_to_the_uninterrupted_weights(reports):
    _, (r0, r1) = reports
    for r in (r0, r1):  # augmentation draws from each process's own generator: each must resume its own
        assert _gap(r["resume"]["resumed"], r["resume"]["uninterrupted"]) < TOLERANCE
        assert [h["epoch"] for h in r["resume"]["history"]] == [1, 2, 3]
    assert "Resumed" in r0["printed"] and "Resumed" not in r1["printed"]


def test_resuming_with_another_number_of_processes_is_refused_with_a_clear_error(reports, tmp_path):
    out, _ = reports
    tr, va = loaders()
    model = net("sync")
    learner = Learner(model, tr, va, torch.optim.SGD(model.parameters(), lr=0.1), callbacks=[Resume(out / "resume.pt")])
    with pytest.raises(RuntimeError, match="written by 2 process"):
        learner.fit(3)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
