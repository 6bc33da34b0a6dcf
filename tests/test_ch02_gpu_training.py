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
from fasttrain.train import Learner, Metrics

SLUG = "02_gpu_training"
SOURCE = Path(__file__).resolve().parent.parent / "solutions" / SLUG / f"{SLUG}.ipynb"


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))


def limited(limit: int) -> speed.SimulatedMemoryLimit:
    return speed.SimulatedMemoryLimit(tiny_model(), max_batch=limit)


def solution_namespace(*grade_ids: str) -> dict:
    """Execute the named solution cells of the chapter (in notebook order) and return their namespace."""
    nb = nbformat.read(SOURCE, as_version=4)
    cells = {c.metadata.get("nbgrader", {}).get("grade_id"): c.source for c in nb.cells}
    missing = [g for g in grade_ids if g not in cells]
    assert not missing, f"solution cells {missing} not found in {SOURCE}"
    namespace = {"torch": torch, "nn": nn, "F": F, "math": math}
    for grade_id in grade_ids:
        exec(compile(cells[grade_id], f"{SLUG}:{grade_id}", "exec"), namespace)
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


def test_fits_in_memory_lets_errors_other_than_out_of_memory_through():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            raise ValueError("shape bug")

    with pytest.raises(ValueError, match="shape bug"):
        speed.fits_in_memory(Broken(), 4, "cpu")


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


def test_training_throughput_rejects_empty_batches():
    with pytest.raises(ValueError, match="empty"):
        speed.training_throughput(tiny_model(), [], "cpu", steps=1, warmup=0)


def test_batch_size_sweep_records_the_first_out_of_memory_and_stops():
    made = []

    def make():
        made.append(limited(20))
        return made[-1]

    rows = speed.batch_size_sweep(make, [8, 16, 32, 64], "cpu", images_per_point=16, min_steps=1, warmup=0,
                                  input_shape=(3, 2, 2))
    assert [r["batch_size"] for r in rows] == [8, 16, 32]
    assert [r["oom"] for r in rows] == [False, False, True]
    assert all(r["images_per_s"] > 0 for r in rows[:2]) and math.isnan(rows[2]["images_per_s"])
    assert len(made) == 3


def test_speed_switch_table_on_the_cpu_measures_what_applies_and_marks_gpu_only_rows():
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 10, (32,))
    rows = speed.speed_switch_table(tiny_model, images, labels, "cpu", batch_size=8, steps=1, warmup=0,
                                    skipped_reason="not timed here")
    status = {r["switch"]: r["status"] for r in rows}
    assert [r["switch"] for r in rows] == list(speed.SWITCHES)
    assert status == {"baseline": "measured", "channels_last": "measured", "autocast": "GPU only",
                      "tf32": "GPU only", "cudnn_benchmark": "GPU only", "compile": "not timed here",
                      "dataloader": "measured", "all": "measured"}
    by_switch = {r["switch"]: r for r in rows}
    assert by_switch["baseline"]["speedup"] == 1.0
    assert all(r["images_per_s"] > 0 for r in rows if r["status"] == "measured")
    assert all(math.isnan(r["images_per_s"]) for r in rows if r["status"] != "measured")


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


# ---------------------------------------------------------------------------------------------
# Grading: real nbgrader on the solution, the blank copy and typical mistakes
# ---------------------------------------------------------------------------------------------

from grading import edit_solution  # noqa: E402


def _edit(grade_id: str, old: str, new: str) -> str:
    """A wrong variant of solution cell `grade_id`: `old` replaced by `new`."""
    return edit_solution(SLUG, grade_id, old, new)


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

# Each student makes two unrelated mistakes (one per exercise group), to keep the number of
# autograded notebooks small; the expected zeros name the tests that must catch them.
WRONG = {
    # The journal's bug (mean of per-batch correct counts) and a probe that only doubles.
    "sums_and_doubling_only": ({
        "epoch_metrics": _metrics_variant(MEAN_OF_SUMS, RIGHT_LOSS),
        "oom_probe": _edit("oom_probe", "    while bad - good > 1:", "    while False:"),
    }, {"test_epoch_metrics_accuracy", "test_find_largest_batch"}),
    # Means of per-batch means (accuracy and loss) and no safety margin.
    "means_and_no_margin": ({
        "epoch_metrics": _metrics_variant(MEAN_OF_MEANS_ACC, MEAN_OF_MEANS_LOSS),
        "oom_probe": _edit("oom_probe", "return max(1, int(good * margin))", "return good"),
    }, {"test_epoch_metrics_accuracy", "test_epoch_metrics_loss", "test_find_largest_batch"}),
    # Right accuracy, loss averaged over batches; a probe that gives up when `start` does not fit.
    "loss_means_and_no_halving": ({
        "epoch_metrics": _metrics_variant(RIGHT_ACC, MEAN_OF_MEANS_LOSS),
        "oom_probe": _edit("oom_probe", "        bad, good = start, None\n",
                           "        raise RuntimeError(f'a batch of {start} does not fit')\n"),
    }, {"test_epoch_metrics_loss", "test_find_largest_batch"}),
    # The journal's second pass over the training set, and a probe that swallows every error.
    "second_pass_and_catch_all": ({
        "train_epoch": SECOND_PASS,
        "oom_probe": _edit("oom_probe", "except torch.OutOfMemoryError:", "except Exception:"),
    }, {"test_train_epoch_one_pass", "test_fits"}),
}
TESTS = {"test_epoch_metrics_accuracy": 2, "test_epoch_metrics_loss": 1, "test_train_epoch_one_pass": 2,
         "test_fits": 1, "test_find_largest_batch": 3}


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
    assert extra["one_pass_metrics"]["one pass"] > 0 and extra["one_pass_metrics"]["second pass"] > 0
    assert {r["switch"]: r["status"] for r in extra["speed_switches"]}["tf32"] == "GPU only"
    sweep = next(iter(extra["batch_size_sweep"].values()))
    assert [r["batch_size"] for r in sweep] == [4, 16, 64, 256]
    assert extra["largest_batch"]["simulated limit 3000: yours"] == extra["largest_batch"]["simulated limit 3000: library"]


def test_smoke_run_shows_the_device_mismatch_error_the_speed_table_and_the_sweep_plot():
    executed, _ = execute_smoke()
    nb = nbformat.read(str(executed), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    text = "\n".join(_outputs(c) for c in code)
    assert "RuntimeError: The model is on cpu but the batch is on meta" in text
    assert "| torch.compile | measured only in the full profile" in text
    assert "| TF32 matmuls and convolutions | GPU only |" in text
    sweep_cell = next(c for c in code if "batch_size_sweep(" in c.source)
    assert any("image/png" in out.get("data", {}) for out in sweep_cell.outputs), "the sweep cell drew no plot"


def execute_smoke():
    from chapters import execute_chapter

    return execute_chapter(SLUG)
