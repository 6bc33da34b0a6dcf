"""fasttrain.train: the Learner's metrics, callbacks and evaluation."""

import pytest
import torch
import torch.nn as nn

from fasttrain.board import LiveBoard, format_history
from fasttrain.train import EVENTS, CancelFit, Callback, Checkpoint, Learner, StopWhen, Timing, evaluate


class Constant(nn.Module):
    """A 'model' whose predictions are fixed per sample: class = x[:, 0] rounded."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        logits = torch.nn.functional.one_hot(x[:, 0].long(), 3).float() * 10 + self.w
        return logits


def batches(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def test_epoch_accuracy_is_correct_over_total_with_an_uneven_last_batch():
    # 10 samples, batches of 4, 4, 2; the last batch is all wrong, the others all right.
    x = torch.tensor([[0.], [1.], [2.], [0.], [1.], [2.], [0.], [1.], [2.], [0.]])
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 1, 1])
    lrn = Learner(Constant(), batches(x, y, 4), optimizer=torch.optim.SGD(Constant().parameters(), lr=0.0))
    lrn.fit(1)
    # correct/total = 8/10; the mean of per-batch accuracies would be (1 + 1 + 0)/3.
    assert lrn.history[0]["train_acc"] == pytest.approx(0.8)


def test_training_metrics_come_from_the_training_pass_not_a_second_pass():
    calls = []

    class Counting(nn.Linear):
        def forward(self, x):
            calls.append(x.shape[0])
            return super().forward(x)

    model = Counting(4, 3)
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    Learner(model, batches(x, y, 5), optimizer=torch.optim.SGD(model.parameters(), lr=0.1)).fit(2)
    assert sum(calls) == 40, "each training sample must be seen once per epoch"


def test_loss_is_weighted_by_batch_size():
    model = nn.Linear(3, 2)
    x, y = torch.randn(7, 3), torch.randint(0, 2, (7,))
    lrn = Learner(model, batches(x, y, 3), batches(x, y, 3), optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    lrn.fit(1)
    expected = torch.nn.functional.cross_entropy(model(x), y).item()
    assert lrn.history[0]["valid_loss"] == pytest.approx(expected, rel=1e-5)
    assert evaluate(model, batches(x, y, 3))["loss"] == pytest.approx(expected, rel=1e-5)


def test_learner_fits_a_separable_problem_and_evaluate_agrees_with_its_valid_metrics():
    torch.manual_seed(0)
    x = torch.randn(200, 2)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
    data = batches(x, y, 32)
    lrn = Learner(model, data, data, torch.optim.Adam(model.parameters(), 0.05), callbacks=[Timing()])
    hist = lrn.fit(15)
    assert hist[-1]["valid_acc"] > 0.95
    assert evaluate(model, data)["acc"] == pytest.approx(hist[-1]["valid_acc"])
    assert hist[-1]["elapsed"] >= hist[-1]["seconds"] > 0


def test_callbacks_run_in_order_and_stop_when_ends_after_the_epoch():
    events = []

    class Log(Callback):
        def __init__(self, name, order):
            self.name, self.order = name, order

        def after_epoch(self):
            events.append(self.name)

    model = nn.Linear(2, 2)
    data = batches(torch.randn(8, 2), torch.randint(0, 2, (8,)), 4)
    lrn = Learner(model, data, callbacks=[Log("late", 30), Log("early", 1), StopWhen(lambda r: r["epoch"] == 2)])
    hist = lrn.fit(10)
    assert events == ["early", "late", "early", "late"], "a callback ordered after StopWhen must see the last epoch"
    assert len(hist) == 2


def test_callbacks_after_stop_when_see_the_stopping_epoch_board_and_best_checkpoint():
    # The loss drops every epoch, so the best epoch is the last one: the one StopWhen stops at.
    torch.manual_seed(0)
    x = torch.randn(64, 2)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(2, 2)
    board = LiveBoard(notebook=False)
    best = Checkpoint("train_loss", mode="min")
    lrn = Learner(model, batches(x, y, 16), optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                  callbacks=[StopWhen(lambda r: r["epoch"] == 3), best, board])
    lrn.fit(10)
    assert StopWhen.order < Checkpoint.order < LiveBoard.order
    assert board.xs["train_loss"] == [1.0, 2.0, 3.0], "the board must get the epoch StopWhen stopped at"
    assert best.best_epoch == 3 and best.best == pytest.approx(lrn.history[-1]["train_loss"])


def test_every_documented_event_is_fired_in_order():
    seen = []

    class Record(Callback):
        pass

    for event in EVENTS:
        setattr(Record, event, lambda self, e=event: seen.append(e))
    model = nn.Linear(2, 2)
    data = batches(torch.randn(4, 2), torch.randint(0, 2, (4,)), 4)
    Learner(model, data, data, callbacks=[Record()]).fit(1)
    assert seen == ["before_fit", "before_epoch", "before_batch", "after_loss", "after_backward", "after_step",
                    "after_batch", "before_validate", "before_batch", "after_loss", "after_batch", "after_validate",
                    "after_epoch", "after_fit"]
    assert set(seen) == set(EVENTS)
    doc = __import__("fasttrain.train", fromlist=["x"]).__doc__
    assert all(event in doc for event in EVENTS), "the module's docstring must list every event it fires"


def test_timing_reports_images_per_second_of_the_training_pass():
    model = nn.Linear(3, 2)
    x, y = torch.randn(30, 3), torch.randint(0, 2, (30,))
    lrn = Learner(model, batches(x, y, 10), batches(x, y, 10), callbacks=[Timing()])
    rec = lrn.fit(2)[-1]
    assert rec["images_per_s"] == pytest.approx(30 / rec["train_seconds"])
    assert 0 < rec["train_seconds"] <= rec["seconds"] <= rec["elapsed"]


def test_clip_norm_bounds_the_gradient_norm_seen_by_the_optimizer():
    norms = []

    class SpyOptimizer(torch.optim.SGD):
        def step(self, closure=None):
            norms.append(torch.nn.utils.get_total_norm([p.grad for g in self.param_groups for p in g["params"]]).item())
            return super().step(closure)

    model = nn.Linear(5, 2)
    x, y = torch.randn(16, 5) * 100, torch.randint(0, 2, (16,))
    Learner(model, batches(x, y, 8), optimizer=SpyOptimizer(model.parameters(), lr=0.1), clip_norm=0.5).fit(1)
    assert len(norms) == 2 and max(norms) <= 0.5 + 1e-5


def test_scheduler_steps_once_per_batch_and_the_rate_is_logged():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    data = batches(torch.randn(12, 2), torch.randint(0, 2, (12,)), 4)
    lrn = Learner(model, data, optimizer=opt, scheduler=sched)
    lrn.fit(1)
    assert lrn.history[0]["lr"] == pytest.approx(0.5 ** 3)


def test_checkpoint_restores_the_best_epoch():
    model = nn.Linear(2, 2)
    data = batches(torch.randn(8, 2), torch.randint(0, 2, (8,)), 4)
    ck = Checkpoint("train_loss", mode="min")
    Learner(model, data, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), callbacks=[ck]).fit(3)
    with torch.no_grad():
        model.weight.add_(100.0)
    ck.restore()
    assert model.weight.abs().max() < 50


def test_cancel_fit_from_a_callback_ends_training_cleanly():
    class Stop(Callback):
        def after_batch(self):
            raise CancelFit

    model = nn.Linear(2, 2)
    data = batches(torch.randn(8, 2), torch.randint(0, 2, (8,)), 4)
    lrn = Learner(model, data, callbacks=[Stop()])
    assert lrn.fit(3) == []
    assert lrn.n_steps == 1


def test_board_logs_lines_outside_a_notebook_and_draws_every_panel(capsys):
    model = nn.Linear(2, 2)
    data = batches(torch.randn(8, 2), torch.randint(0, 2, (8,)), 4)
    board = LiveBoard(notebook=False)
    Learner(model, data, data, callbacks=[board]).fit(2)
    out = capsys.readouterr().out
    assert "epoch 1" in out and "epoch 2" in out and "valid_acc" in out
    fig = board.close()
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy"]
    assert len(fig.axes[0].lines) == 2
    assert "train_loss" in format_history(board.learner.history)
