"""Chapter 2 (training on the GPU): the speed library, the device check, the exercises' solutions
against the library, and the exercises' grading."""

from __future__ import annotations

import math
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fasttrain import speed
from fasttrain.batches import normalize
from fasttrain.tables import format_table
from fasttrain import train
from fasttrain.batches import DeviceLoader
from fasttrain.train import Learner, Metrics, eval_mode

SLUG = "02_gpu_training"
SOURCE = Path(__file__).resolve().parent.parent / "solutions" / SLUG / f"{SLUG}.ipynb"


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))


def limited(limit: int) -> speed.SimulatedMemoryLimit:
    return speed.SimulatedMemoryLimit(tiny_model(), max_batch=limit)


def solution_namespace(*names: str) -> dict:
    """Execute the named cells of the chapter (grade ids or cell ids, in the order given) and return their namespace."""
    nb = nbformat.read(SOURCE, as_version=4)
    cells = {c.get("id"): c.source for c in nb.cells}
    cells.update({c.metadata["nbgrader"]["grade_id"]: c.source for c in nb.cells if "nbgrader" in c.metadata})
    missing = [g for g in names if g not in cells]
    assert not missing, f"cells {missing} not found in {SOURCE}"
    namespace = {"torch": torch, "nn": nn, "F": F, "math": math, "eval_mode": eval_mode}
    for name in names:
        exec(compile(cells[name], f"{SLUG}:{name}", "exec"), namespace)
    return namespace


# ---------------------------------------------------------------------------------------------
# The device check the chapter demonstrates
# ---------------------------------------------------------------------------------------------

def test_learner_refuses_a_model_on_the_cpu_with_a_batch_elsewhere():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    xb, yb = torch.randn(4, 3, 2, 2, device="meta"), torch.zeros(4, dtype=torch.long, device="meta")
    with pytest.raises(RuntimeError, match=r"model is on cpu but the batch is on meta.*model\.to\(device\)"):
        Learner(model, [(xb, yb)]).fit(1)


# ---------------------------------------------------------------------------------------------
# fasttrain.speed: the out-of-memory probe
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("limit,start,margin", [(300, 16, 0.9), (1000, 16, 0.9), (5000, 16, 0.9), (4096, 16, 0.5),
                                                (777, 5, 0.8), (37, 64, 0.9), (1, 16, 0.9)])
def test_largest_batch_size_is_the_limit_times_the_margin(limit, start, margin):
    got = speed.largest_batch_size(limited(limit), "cpu", (3, 2, 2), start=start, max_batch=16384, margin=margin)
    assert got == max(1, int(limit * margin))


def test_largest_batch_size_stops_at_max_batch_when_everything_fits():
    model = limited(10**9)
    assert speed.largest_batch_size(model, "cpu", (3, 2, 2), start=16, max_batch=1000, margin=0.9) == 900
    assert max(model.tried) == 1000


def test_largest_batch_size_needs_about_two_log2_probes():
    model = limited(5000)
    speed.largest_batch_size(model, "cpu", (3, 2, 2), start=16, max_batch=16384)
    assert len(model.tried) <= 2 * math.ceil(math.log2(16384 / 16)) + 2


def test_largest_batch_size_raises_when_not_even_one_image_fits():
    with pytest.raises(RuntimeError, match="Not even a batch of 1"):
        speed.largest_batch_size(limited(0), "cpu", (3, 2, 2))


def test_largest_batch_size_rejects_bad_arguments():
    with pytest.raises(ValueError, match="margin"):
        speed.largest_batch_size(limited(10), "cpu", margin=1.5)
    with pytest.raises(ValueError, match="start"):
        speed.largest_batch_size(limited(10), "cpu", start=64, max_batch=32)


def test_fits_in_memory_lets_a_real_shape_error_through():
    shape_bug = nn.Sequential(nn.Flatten(), nn.Linear(5, 3))       # 12 input features, not 5: a RuntimeError
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as caught:
        speed.fits_in_memory(shape_bug, 4, "cpu", (3, 2, 2))
    assert not isinstance(caught.value, torch.OutOfMemoryError)


def test_simulated_limit_runs_out_of_memory_in_the_backward_pass_like_a_gpu():
    model = limited(100)
    with torch.no_grad():
        assert model(torch.randn(200, 3, 2, 2)).shape == (200, 10)    # a forward pass alone needs less memory
    out = model(torch.randn(150, 3, 2, 2))
    with pytest.raises(torch.OutOfMemoryError, match="backward"):
        F.cross_entropy(out, torch.zeros(150, dtype=torch.long)).backward()
    with pytest.raises(torch.OutOfMemoryError, match="forward"):
        model(torch.randn(201, 3, 2, 2))
    assert model.tried == [200, 150, 201]


def test_a_forward_only_probe_overestimates_the_batch_that_trains():
    def forward_only(model, n):
        try:
            with torch.no_grad():
                model(torch.randn(n, 3, 2, 2))
            return True
        except torch.OutOfMemoryError:
            return False

    model = limited(300)
    assert forward_only(model, 600) and not speed.fits_in_memory(model, 301, "cpu", (3, 2, 2))
    assert speed.largest_batch_size(model, "cpu", (3, 2, 2), margin=1.0) == 300


def test_fits_in_memory_clears_the_gradients_of_its_probe():
    model = limited(50)
    assert speed.fits_in_memory(model, 10, "cpu", (3, 2, 2))
    assert not speed.fits_in_memory(model, 51, "cpu", (3, 2, 2))
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# fasttrain.speed: throughput, the sweep, the switches table
# ---------------------------------------------------------------------------------------------

def test_training_throughput_runs_warmup_then_timed_steps_and_updates_the_model():
    model = limited(10**6)
    before = [p.detach().clone() for p in model.parameters()]
    rate = speed.training_throughput(model, speed.random_batches(8, "cpu", (3, 2, 2)), "cpu",
                                     steps=3, warmup=2, repeats=2)
    assert math.isfinite(rate) and rate > 0
    assert model.tried == [8] * (2 + 3 * 2)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_throughput_runs_gives_one_rate_per_repeat():
    rates = speed.throughput_runs(tiny_model(), speed.random_batches(8, "cpu", (3, 2, 2)), "cpu", steps=2, warmup=1,
                                  repeats=4)
    assert len(rates) == 4 and all(r > 0 for r in rates)
    with pytest.raises(ValueError, match="repeats"):
        speed.throughput_runs(tiny_model(), speed.random_batches(8, "cpu", (3, 2, 2)), "cpu", repeats=0)


def test_training_throughput_rejects_empty_batches():
    with pytest.raises(ValueError, match="empty"):
        speed.training_throughput(tiny_model(), [], "cpu", steps=1, warmup=0)


def test_batch_size_sweep_records_the_first_out_of_memory_and_stops():
    made = []

    def make():
        made.append(limited(20))
        return made[-1]

    rows = speed.batch_size_sweep(make, [8, 16, 32, 64], "cpu", images_per_point=16, min_steps=1, warmup=1,
                                  input_shape=(3, 2, 2))
    assert [r["batch_size"] for r in rows] == [8, 16, 32]
    assert [r["oom"] for r in rows] == [False, False, True]
    assert all(r["images_per_s"] > 0 for r in rows[:2]) and math.isnan(rows[2]["images_per_s"])
    assert len(made) == 3, "the warm-up found the size that does not fit: no larger model was made"
    rows = speed.batch_size_sweep(make, [8, 16, 32, 64], "cpu", images_per_point=16, min_steps=1, warmup=0,
                                  input_shape=(3, 2, 2))
    assert [(r["batch_size"], r["oom"]) for r in rows] == [(8, False), (16, False), (32, True)]


def test_batch_size_sweep_warms_every_size_up_and_then_times_the_sizes_in_turns(monkeypatch):
    order = []
    real_rate = speed.StepTimer.rate
    monkeypatch.setattr(speed.StepTimer, "rate", lambda self, n: (order.append(n), real_rate(self, n))[1])
    speed.batch_size_sweep(tiny_model, [4, 8, 16], "cpu", images_per_point=32, min_steps=1, warmup=1, repeats=2,
                           input_shape=(3, 2, 2))
    assert order == [8, 4, 2, 4, 2, 8]          # steps per size: 32 images per point; round 2 starts at size 8


def test_batch_size_sweep_reports_the_median_and_range_of_its_repeats():
    rows = speed.batch_size_sweep(tiny_model, [4, 8], "cpu", images_per_point=16, min_steps=1, warmup=1, repeats=3,
                                  input_shape=(3, 2, 2))
    for row in rows:
        assert len(row["runs"]) == 3
        assert row["low"] <= row["images_per_s"] <= row["high"]
        assert row["images_per_s"] == sorted(row["runs"])[1]
        assert row["ms_per_step"] == pytest.approx(1000 * row["batch_size"] / row["images_per_s"])


def _images(n=32):
    return torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (n,))


def test_speed_switch_table_on_the_cpu_measures_the_switches_asked_for_and_marks_the_others():
    images, labels = _images()
    rows = speed.speed_switch_table(tiny_model, images, labels, "cpu",
                                    switches=["baseline", "channels_last", "dataloader", "all"], batch_size=8, steps=1,
                                    warmup=0, repeats=2, skipped_reason="not timed here")
    status = {r["switch"]: r["status"] for r in rows}
    assert [r["switch"] for r in rows] == list(speed.SWITCHES)
    assert status == {"baseline": "measured", "channels_last": "measured", "autocast": "GPU only",
                      "tf32": "GPU only", "cudnn_benchmark": "GPU only", "compile": "not timed here",
                      "dataloader": "measured", "all": "measured"}
    by_switch = {r["switch"]: r for r in rows}
    assert by_switch["baseline"]["speedup"] == 1.0
    for r in rows:
        if r["status"] == "measured":
            assert len(r["runs"]) == 2 and r["low"] <= r["images_per_s"] <= r["high"] and r["warmup_seconds"] >= 0
        else:
            assert math.isnan(r["images_per_s"]) and r["runs"] == []


def test_speed_switch_table_compiles_the_compile_row_with_the_options_given():
    images, labels = _images()
    rows = speed.speed_switch_table(tiny_model, images, labels, "cpu", switches=["baseline", "compile"], batch_size=8,
                                    steps=2, warmup=2, repeats=1, compile_options={"backend": "aot_eager"})
    compiled = next(r for r in rows if r["switch"] == "compile")
    assert compiled["status"] == "measured" and compiled["images_per_s"] > 0
    assert compiled["warmup_seconds"] > 0


def test_speed_switch_table_times_the_rows_in_turns_after_every_warm_up(monkeypatch):
    order = []
    real_warm_up, real_rate = speed.StepTimer.warm_up, speed.StepTimer.rate
    monkeypatch.setattr(speed.StepTimer, "warm_up", lambda self, n: (order.append(("warm", self.step.name)),
                                                                     real_warm_up(self, n))[1])
    monkeypatch.setattr(speed.StepTimer, "rate", lambda self, n: (order.append(("time", self.step.name)),
                                                                  real_rate(self, n))[1])
    images, labels = _images()
    speed.speed_switch_table(tiny_model, images, labels, "cpu", switches=["baseline", "channels_last"], batch_size=8,
                             steps=1, warmup=1, repeats=2)
    names = [name for _, name in order]
    assert [kind for kind, _ in order] == ["warm", "warm", "time", "time", "time", "time"]
    assert names[2:4] == names[:2] and names[4:6] == names[1::-1], names     # the second round starts with row 2


def test_speed_switch_table_rejects_unknown_switches_and_a_table_without_baseline():
    images, labels = _images()
    with pytest.raises(ValueError, match="baseline"):
        speed.speed_switch_table(tiny_model, images, labels, "cpu", switches=["turbo", "baseline"])
    with pytest.raises(ValueError, match="baseline"):
        speed.speed_switch_table(tiny_model, images, labels, "cpu", switches=["channels_last"])


def test_switch_applies_knows_which_switches_need_a_gpu():
    assert speed.switch_applies("channels_last", "cpu") and speed.switch_applies("dataloader", "cpu")
    assert not speed.switch_applies("tf32", "cpu") and not speed.switch_applies("cudnn_benchmark", "cpu")
    assert not speed.switch_applies("autocast", "cpu")
    assert speed.switch_applies("tf32", "cuda") and speed.switch_applies("autocast", "cuda")
    with pytest.raises(ValueError, match="Unknown speed switch"):
        speed.switch_applies("turbo", "cpu")


def test_backend_flags_set_tf32_and_benchmark_then_restore_them():
    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
             torch.backends.cudnn.benchmark)
    with speed.backend_flags(tf32=True, cudnn_benchmark=True):
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        assert torch.backends.cudnn.benchmark is True
    with speed.backend_flags(tf32=False):
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
            torch.backends.cudnn.benchmark) == saved


def test_dataloader_batches_are_normalised_like_the_device_path():
    images = torch.randint(0, 256, (12, 3, 4, 4), dtype=torch.uint8)
    labels = torch.arange(12)
    loader = speed.dataloader_batches(images, labels, batch_size=4, device="cpu")
    assert len(loader) == 3
    for xb, yb in loader:
        assert xb.dtype == torch.float32 and xb.shape == (4, 3, 4, 4)
        torch.testing.assert_close(xb, normalize(images[yb]))


def test_format_table_writes_markdown_with_formats_and_dashes_for_nan():
    text = format_table([{"a": "x", "b": 1234.5, "c": float("nan")}], {"a": "A", "b": "B", "c": "C"},
                              {"b": ".1f"})
    assert text.splitlines() == ["| A | B | C |", "|---|---|---|", "| x | 1234.5 | - |"]


# ---------------------------------------------------------------------------------------------
# The exercises' solutions agree with the library
# ---------------------------------------------------------------------------------------------

def test_epoch_metrics_solution_agrees_with_the_learners_metrics_on_an_uneven_epoch():
    EpochMetrics = solution_namespace("epoch_metrics")["EpochMetrics"]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    x, y = torch.randn(23, 3, 2, 2), torch.randint(0, 4, (23,))
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 23, 8)]      # 8, 8, 7
    learner = Learner(model, [], batches, torch.optim.SGD(model.parameters(), lr=0.0))
    record = learner.fit(1)[0]
    ours = EpochMetrics()
    model.eval()
    with torch.no_grad():
        for xb, yb in batches:
            logits = model(xb)
            ours.update(F.cross_entropy(logits, yb), logits, yb)
    result = ours.compute()
    assert result["acc"] == pytest.approx(record["valid_acc"], abs=1e-9)
    assert result["loss"] == pytest.approx(record["valid_loss"], rel=1e-6)
    assert isinstance(learner.callbacks[0], Metrics)


def test_train_epoch_solution_gives_the_learners_training_metrics():
    ns = solution_namespace("epoch_metrics", "train_epoch")
    x, y = torch.randn(30, 3, 2, 2), torch.randint(0, 3, (30,))
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 30, 8)]
    results = []
    for run in ("exercise", "learner"):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        if run == "exercise":
            results.append(ns["train_epoch"](model, batches, opt))
        else:
            rec = Learner(model, batches, None, opt).fit(1)[0]
            results.append({"loss": rec["train_loss"], "acc": rec["train_acc"]})
    assert results[0]["acc"] == pytest.approx(results[1]["acc"], abs=1e-9)
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-6)


@pytest.mark.parametrize("limit,start,max_batch,margin", [(300, 16, 16384, 0.9), (5000, 16, 16384, 0.9),
                                                          (37, 64, 16384, 0.9), (10**9, 16, 1024, 0.9),
                                                          (777, 5, 16384, 0.8)])
def test_find_largest_batch_solution_agrees_with_the_library(limit, start, max_batch, margin):
    find_largest_batch = solution_namespace("oom_probe")["find_largest_batch"]
    yours = find_largest_batch(limited(limit), "cpu", (3, 2, 2), start=start, max_batch=max_batch, margin=margin)
    library = speed.largest_batch_size(limited(limit), "cpu", (3, 2, 2), start=start, max_batch=max_batch,
                                       margin=margin)
    assert yours == library


class _EventLog:
    """A callback for either learner: every event, with the epoch, the model's mode and whether gradients were on."""

    order = -100

    def __init__(self):
        self.log = []


def _logger(event):
    def log(self):
        lrn = self.learner
        self.log.append((event, getattr(lrn, "epoch", None), lrn.model.training, torch.is_grad_enabled()))
    return log


for _event in train.EVENTS:
    setattr(_EventLog, _event, _logger(_event))


class _CancelAt:
    """Raise `exception` the `nth` time `event` fires."""

    def __init__(self, event, nth, exception):
        self.order, self.nth, self.exception, self.seen = 0, nth, exception, 0
        setattr(self, event, self.fire)

    def fire(self):
        self.seen += 1
        if self.seen == self.nth:
            raise self.exception()


def _cifar_like(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _small_cnn(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(6 * 16, 10))


def _both_learners(ns, make_data, epochs, cancels=(), seed=0):
    """The chapter's Learner (with its metrics callback) and the library's, on the same data and seed."""
    out = {}
    for who in ("chapter", "library"):
        train_data, valid_data = make_data()
        model = _small_cnn(seed)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        log = _EventLog()
        excs = ns if who == "chapter" else vars(train)
        extra = [_CancelAt(event, nth, excs[name]) for event, nth, name in cancels]
        if who == "chapter":
            history = ns["Learner"](model, train_data, valid_data, opt,
                                    callbacks=[log, ns["MetricsCallback"](), *extra]).fit(epochs)
        else:
            history = Learner(model, train_data, valid_data, opt, callbacks=[log, *extra]).fit(epochs)
        out[who] = (log.log, history, model.state_dict())
    return out


def _device_loaders():
    x, y = _cifar_like(70, 1)
    xv, yv = _cifar_like(23, 2)
    to_float = lambda xb: xb.float() / 255
    return (DeviceLoader(x, y, 16, shuffle=True, seed=3, transform=to_float),
            DeviceLoader(xv, yv, 10, shuffle=False, transform=to_float))


def _lists():
    x, y = _cifar_like(45, 4)
    xv, yv = _cifar_like(9, 5)
    return ([(x[i:i + 13].float() / 255, y[i:i + 13]) for i in range(0, 45, 13)], [(xv.float() / 255, yv)])


@pytest.mark.parametrize("make_data,cancels", [
    (_device_loaders, ()),
    (_lists, ()),
    (_lists, [("after_backward", 2, "CancelBatch"), ("before_validate", 1, "CancelEpoch")]),
    (_device_loaders, [("after_step", 6, "CancelEpoch"), ("after_batch", 11, "CancelFit")]),
], ids=["device-loaders", "odd-batches", "cancel-batch-and-epoch", "cancel-epoch-and-fit"])
def test_the_chapters_learner_fires_the_librarys_events_and_gives_its_history(make_data, cancels):
    ns = solution_namespace("epoch_metrics", "callbacks", "learner", "metrics-callback")
    runs = _both_learners(ns, make_data, epochs=3, cancels=cancels)
    (log_c, hist_c, state_c), (log_l, hist_l, state_l) = runs["chapter"], runs["library"]
    assert log_c == log_l
    assert [r["epoch"] for r in hist_c] == [r["epoch"] for r in hist_l]
    for mine, theirs in zip(hist_c, hist_l):
        assert set(mine) == set(theirs) - {"lr"}
        for key, value in theirs.items():
            assert mine[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (mine["epoch"], key)
    for key in state_l:
        torch.testing.assert_close(state_c[key], state_l[key])


def test_the_chapters_callbacks_run_in_order_and_a_cancelled_fit_still_ends_with_after_fit():
    ns = solution_namespace("callbacks", "learner")
    seen = []

    class Note:
        def __init__(self, name, order):
            self.name, self.order = name, order

        def after_fit(self):
            seen.append(self.name)

    model = _small_cnn(0)
    x, y = _cifar_like(8, 0)
    stop = _CancelAt("before_batch", 1, ns["CancelFit"])
    history = ns["Learner"](model, [(x.float(), y)], None, torch.optim.SGD(model.parameters(), lr=0.1),
                            callbacks=[Note("late", 10), stop, Note("early", -3), Note("also late", 10)]).fit(2)
    assert history == [] and seen == ["early", "late", "also late"]


# ---------------------------------------------------------------------------------------------
# Grading: real nbgrader on the solution, the blank copy and typical mistakes
# ---------------------------------------------------------------------------------------------

from grading import edit_solution  # noqa: E402


def _edit(grade_id: str, *pairs: str) -> str:
    """A wrong variant of solution cell `grade_id`: each `old` of the (old, new) pairs replaced by its `new`."""
    src = edit_solution(SLUG, grade_id, pairs[0], pairs[1])
    for old, new in zip(pairs[2::2], pairs[3::2]):
        assert old in src, f"{old!r} not in {grade_id}: update this test"
        src = src.replace(old, new)
    return src


def _metrics_variant(acc: str, loss: str) -> str:
    """EpochMetrics that keeps per-batch values in lists and averages them (the journal's kind of bug)."""
    return f'''class EpochMetrics:
    def __init__(self):
        self.correct, self.sizes, self.losses = [], [], []

    def update(self, loss, logits, targets):
        self.correct.append(float((logits.argmax(1) == targets).sum()))
        self.sizes.append(targets.shape[0])
        self.losses.append(float(loss))

    def compute(self):
        n = len(self.sizes)
        return {{"acc": {acc}, "loss": {loss}}}
'''


RIGHT_LOSS = "sum(l * s for l, s in zip(self.losses, self.sizes)) / sum(self.sizes)"
RIGHT_ACC = "sum(self.correct) / sum(self.sizes)"
MEAN_OF_SUMS = "sum(self.correct) / n"
MEAN_OF_MEANS_ACC = "sum(c / s for c, s in zip(self.correct, self.sizes)) / n"
MEAN_OF_MEANS_LOSS = "sum(self.losses) / n"

SECOND_PASS = '''def train_epoch(model, batches, optimizer):
    model.train()
    for xb, yb in batches:
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    metrics = EpochMetrics()
    with torch.no_grad():
        for xb, yb in batches:
            logits = model(xb)
            metrics.update(F.cross_entropy(logits, yb), logits, yb)
    return metrics.compute()
'''

# Its own sums, with the loss added as it is: every batch's graph stays alive until float() (and torch warns).
GRAPH_KEEPING_EPOCH = '''def train_epoch(model, batches, optimizer):
    model.train()
    total_loss, correct, n = 0.0, 0, 0
    for xb, yb in batches:
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total_loss = total_loss + loss * len(yb)
        correct += (logits.argmax(1) == yb).sum().item()
        n += len(yb)
    return {"loss": float(total_loss) / n, "acc": correct / n}
'''

# The journal's own probe (004): a forward pass under no_grad, no backward pass.
FORWARD_ONLY_FITS = '''    device = torch.device(device)
    try:
        with torch.no_grad():
            model(torch.randn(batch_size, *input_shape, device=device))
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
'''

SOLUTION_FITS_BODY = '''    device = torch.device(device)
    try:
        x = torch.randn(batch_size, *input_shape, device=device)
        y = torch.randint(0, 10, (batch_size,), device=device)
        F.cross_entropy(model(x), y).backward()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
'''

# Each student makes two unrelated mistakes (in different exercises), to keep the number of autograded
# notebooks small; the expected zeros name the tests that must catch them, and every other test keeps its points.
WRONG = {
    # The journal's bug (mean of per-batch correct counts, float() per batch) and a probe that only doubles.
    "sums_and_doubling_only": ({
        "epoch_metrics": _metrics_variant(MEAN_OF_SUMS, RIGHT_LOSS),
        "oom_probe": _edit("oom_probe", "    while bad - good > 1:", "    while False:"),
    }, {"test_epoch_metrics_accuracy", "test_epoch_metrics_on_the_device", "test_find_largest_batch"}),
    # Means of per-batch means (accuracy and loss) and no safety margin.
    "means_and_no_margin": ({
        "epoch_metrics": _metrics_variant(MEAN_OF_MEANS_ACC, MEAN_OF_MEANS_LOSS),
        "oom_probe": _edit("oom_probe", "return max(1, int(good * margin))", "return good"),
    }, {"test_epoch_metrics_accuracy", "test_epoch_metrics_loss", "test_epoch_metrics_on_the_device",
        "test_find_largest_batch"}),
    # Right accuracy, loss averaged over batches; a probe that gives up when `start` does not fit.
    "loss_means_and_no_halving": ({
        "epoch_metrics": _metrics_variant(RIGHT_ACC, MEAN_OF_MEANS_LOSS),
        "oom_probe": _edit("oom_probe", "        bad, good = start, None\n",
                           "        raise RuntimeError(f'a batch of {start} does not fit')\n"),
    }, {"test_epoch_metrics_loss", "test_epoch_metrics_on_the_device", "test_find_largest_batch"}),
    # The journal's second pass over the training set (in training mode), and a probe that swallows every error.
    "second_pass_and_catch_all": ({
        "train_epoch": SECOND_PASS,
        "oom_probe": _edit("oom_probe", "except torch.OutOfMemoryError:", "except Exception:"),
    }, {"test_train_epoch_one_pass", "test_train_epoch_duties", "test_fits"}),
    # New: sums that keep the autograd graph (no detach), and `except RuntimeError` (OutOfMemoryError's base class).
    "no_detach_and_catch_runtime_error": ({
        "epoch_metrics": _edit("epoch_metrics", "loss.detach().float() * n", "loss.float() * n",
                               "logits.detach().argmax(dim=1)", "logits.argmax(dim=1)"),
        "oom_probe": _edit("oom_probe", "except torch.OutOfMemoryError:", "except RuntimeError:"),
    }, {"test_epoch_metrics_on_the_device", "test_fits"}),
    # New: gradients never cleared (they pile up), and callbacks called in the order of the list.
    "no_zero_grad_and_unsorted_callbacks": ({
        "train_epoch": _edit("train_epoch", "        optimizer.zero_grad(set_to_none=True)\n", ""),
        "callbacks": _edit("callbacks", "for cb in sorted(callbacks, key=lambda cb: getattr(cb, \"order\", 0)):",
                           "for cb in callbacks:"),
    }, {"test_train_epoch_duties", "test_run_callbacks"}),
    # New: the model left in eval mode by an evaluation, and after_fit skipped when a callback cancels the fit.
    "eval_mode_left_and_no_finally": ({
        "train_epoch": _edit("train_epoch", "    model.train()\n", ""),
        "learner": _edit("learner", '''        try:
            self.callback("before_fit")
            for self.epoch in range(epochs):
                self.one_epoch()
        except CancelFit:
            pass
        finally:
            self.callback("after_fit")
        return self.history''', '''        self.callback("before_fit")
        try:
            for self.epoch in range(epochs):
                self.one_epoch()
        except CancelFit:
            return self.history
        self.callback("after_fit")
        return self.history'''),
    }, {"test_train_epoch_duties", "test_learner_cancel"}),
    # New: the journal's forward-only probe under no_grad, and a validation pass in training mode with gradients.
    "forward_only_probe_and_validation_with_gradients": ({
        "oom_probe": _edit("oom_probe", SOLUTION_FITS_BODY, FORWARD_ONLY_FITS),
        "learner": _edit("learner", '''                with eval_mode(self.model), torch.no_grad():
                    self.callback("before_validate")
                    self.run_batches(self.valid_data)
                    self.callback("after_validate")''', '''                self.callback("before_validate")
                self.run_batches(self.valid_data)
                self.callback("after_validate")'''),
    }, {"test_fits", "test_find_largest_batch", "test_learner_events", "test_learner_history",
        "test_learner_cancel"}),  # the cancel test compares each event's details (training mode) with the library's
    # New: .item() on every batch (right numbers, a synchronisation per batch), and CancelEpoch taken for the end of
    # the pass (validation and after_epoch still run).
    "item_per_batch_and_cancel_epoch_ends_the_pass": ({
        "epoch_metrics": _edit("epoch_metrics", "loss.detach().float() * n", "loss.item() * n",
                               "(logits.detach().argmax(dim=1) == targets).sum()",
                               "(logits.detach().argmax(dim=1) == targets).sum().item()"),
        "learner": _edit("learner", '''            except CancelBatch:
                pass''', '''            except CancelBatch:
                pass
            except CancelEpoch:
                break'''),
    }, {"test_epoch_metrics_on_the_device", "test_learner_cancel"}),
    # New: its own loss sum that keeps every graph, and a bisection that returns the first size that did not fit.
    "graph_kept_and_bisect_off_by_one": ({
        "train_epoch": GRAPH_KEEPING_EPOCH,
        "oom_probe": _edit("oom_probe", "    while bad - good > 1:", "    while bad - good > 1:",
                           "            bad = mid\n    return max(1, int(good * margin))",
                           "            bad = mid\n    return max(1, int(bad * margin))"),
    }, {"test_train_epoch_duties", "test_find_largest_batch"}),
}
TESTS = {"test_epoch_metrics_accuracy": 2, "test_epoch_metrics_loss": 1, "test_epoch_metrics_on_the_device": 1,
         "test_train_epoch_one_pass": 2, "test_train_epoch_duties": 2, "test_run_callbacks": 1,
         "test_learner_events": 2, "test_learner_cancel": 2, "test_learner_history": 2, "test_fits": 1,
         "test_find_largest_batch": 3}


@pytest.fixture(scope="module")
def scores():
    from grading import grade_variants

    return grade_variants(SLUG, {name: variant for name, (variant, _) in WRONG.items()}, timeout=60)


def test_solution_gets_full_marks_and_the_blank_copy_zero(scores):
    assert scores["solution"]["total"] == scores["solution"]["max"] == sum(TESTS.values())
    assert all(scores["solution"][t] == p for t, p in TESTS.items()), scores["solution"]
    assert scores["blank"]["total"] == 0, scores["blank"]


@pytest.mark.parametrize("variant", sorted(WRONG))
def test_typical_mistakes_lose_the_points_of_their_tests_and_only_those(scores, variant):
    s = scores[variant]
    caught = WRONG[variant][1]
    assert all(s[t] == 0 for t in caught), f"{variant} should score 0 on {sorted(caught)}: {s}"
    assert all(s[t] == p for t, p in TESTS.items() if t not in caught), f"{variant} lost other points: {s}"


def test_grading_reports_no_tampering_and_no_changed_checksums(scores):
    assert "has changed" not in scores.log and "Tampering" not in scores.log, scores.log[-2000:]


# ---------------------------------------------------------------------------------------------
# The smoke run
# ---------------------------------------------------------------------------------------------

def _outputs(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        data = out.get("data", {})
        parts.append(data.get("text/plain", "") + data.get("text/markdown", ""))
    return "".join(parts)


def test_smoke_run_reaches_its_target_and_records_the_speed_measurements():
    executed, record = execute_smoke()
    assert record["chapter"] == SLUG and record["profile"] == "smoke"
    assert record["passed"] is True, record
    assert {m["metric"] for m in record["metrics"]} == {"final_cnn_test_accuracy"}
    extra = record["extra"]
    one_pass = extra["one_pass_metrics"]
    assert all(t > 0 for key in ("one pass", "second pass") for t in one_pass["seconds"][key])
    assert one_pass["speedup_low"] <= one_pass["speedup"] <= one_pass["speedup_high"]
    status = {r["switch"]: r["status"] for r in extra["speed_switches"]}
    assert status["tf32"] == "GPU only" and status["compile"] == "not measured in the smoke profile"
    sweep = extra["batch_size_sweep"]["device"]["rows"]
    assert [r["batch_size"] for r in sweep] == [4, 16, 64, 256]
    assert all(len(r["runs"]) == 2 for r in sweep)
    assert extra["largest_batch"]["simulated limit 3000: yours"] == extra["largest_batch"]["simulated limit 3000: library"]
    assert extra["learner_agreement"]["largest_difference"] < 1e-6, extra["learner_agreement"]


def test_smoke_run_shows_the_device_mismatch_error_the_speed_table_the_plots_and_generated_prose():
    executed, _ = execute_smoke()
    nb = nbformat.read(str(executed), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    text = "\n".join(_outputs(c) for c in code)
    assert "RuntimeError: The model is on cpu but the batch is on meta" in text
    assert "| torch.compile | not measured in the smoke profile" in text
    assert "| TF32 matmuls and convolutions | GPU only |" in text
    for source in ("batch_size_sweep(", "speed_switch_table("):
        cell = next(c for c in code if source in c.source)
        assert any("image/png" in out.get("data", {}) for out in cell.outputs), f"the cell calling {source} drew no plot"
    said = {c.get("id"): _outputs(c) for c in code if "remove-input" in c.metadata.get("tags", [])}
    assert set(said) == {"sweep-say", "one-pass-say", "learner-say", "speed-say", "probe-say", "final-say"}
    assert all(said.values()), [k for k, v in said.items() if not v]
    assert "training throughput went from" in said["sweep-say"] and "Dropping the second pass" in said["one-pass-say"]


def test_smoke_run_prints_nothing_to_stderr_in_the_graded_cells():
    executed, _ = execute_smoke()
    nb = nbformat.read(str(executed), as_version=4)
    noisy = [c.metadata["nbgrader"]["grade_id"] for c in nb.cells
             if c.metadata.get("nbgrader", {}).get("grade") and
             any(o.get("output_type") == "stream" and o.get("name") == "stderr" for o in c.get("outputs", []))]
    assert not noisy, f"graded cells that print to stderr (nbgrader scores them 0): {noisy}"


def execute_smoke():
    from chapters import execute_chapter

    return execute_chapter(SLUG)
