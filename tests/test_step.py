"""fasttrain.step and resuming: one training step in fp32, bf16 and fp16 with a GradScaler; non-finite losses; resume."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fasttrain import device as device_module
from fasttrain.batches import DeviceLoader, Preprocess
from fasttrain.device import autocast_dtype, force_autocast_dtype
from fasttrain.step import NonFiniteLossError, TrainStep
from fasttrain.train import Callback, Learner, Resume, rng_state, set_rng_state


def small_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, 10))


def train_steps(dtype, steps=5, clip_norm=None):
    """Parameters after `steps` SGD steps with autocast forced to `dtype` (None: fp32), and the step used."""
    force_autocast_dtype(dtype)
    try:
        torch.manual_seed(0)
        model = small_cnn()
        x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
        step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                         mixed_precision=dtype is not None, clip_norm=clip_norm)
        for _ in range(steps):
            step(x, y)
        return [p.detach().clone() for p in model.parameters()], step
    finally:
        force_autocast_dtype(None)


# The stated tolerance of the low-precision paths against fp32 after 5 steps, relative to the
# largest parameter change fp32 made: bf16 keeps 8 bits of mantissa, fp16 10.
TOLERANCE = {torch.bfloat16: 0.05, torch.float16: 0.02}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_steps_stay_within_tolerance_of_fp32(dtype):
    torch.manual_seed(0)
    start = [p.detach().clone() for p in small_cnn().parameters()]
    fp32, _ = train_steps(None)
    low, step = train_steps(dtype)
    change = max((a - s).abs().max().item() for a, s in zip(fp32, start))
    error = max((a - b).abs().max().item() for a, b in zip(fp32, low))
    assert change > 0.01, "the test needs steps that move the weights"
    assert error <= TOLERANCE[dtype] * change, f"{dtype}: {error:.3g} off fp32 after 5 steps (moved {change:.3g})"
    assert error > 0, f"{dtype} gave exactly fp32's weights: autocast did not run"
    assert (step.scaler is not None) == (dtype == torch.float16), "a GradScaler exactly when the dtype is fp16"


def test_fp16_clipping_unscales_first():
    low, step = train_steps(torch.float16, steps=3, clip_norm=0.01)
    fp32, _ = train_steps(None, steps=3, clip_norm=0.01)
    assert step.scaler.get_scale() > 1, "the scaler keeps a large loss scale"
    # Clipping the scaled gradients would clip far more (by the loss scale) and barely move the weights.
    error = max((a - b).abs().max().item() for a, b in zip(fp32, low))
    assert error < 1e-2


def test_bf16_is_chosen_only_where_the_gpu_has_it_natively(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, expected in [((7, 5), torch.float16), ((7, 0), torch.float16), ((8, 0), torch.bfloat16),
                                 ((9, 0), torch.bfloat16)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        assert autocast_dtype("cuda") == expected, f"compute capability {capability}"
    assert device_module.autocast_dtype("cpu") is None


def test_a_non_finite_loss_stops_training_naming_epoch_step_and_causes():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = torch.randn(40, 4), torch.randn(40, 1)
    data = [(x[i:i + 10], y[i:i + 10]) for i in range(0, 40, 10)]
    lrn = Learner(model, data, optimizer=torch.optim.SGD(model.parameters(), lr=50.0), loss_fn=F.mse_loss)
    with pytest.raises(NonFiniteLossError) as err:
        lrn.fit(100)
    message = str(err.value)
    assert f"epoch {lrn.epoch + 1}, step {lrn.n_steps + 1}" in message
    assert "learning rate" in message and "fp16" in message
    assert lrn.n_steps < 400, "training must stop at the first non-finite loss, not run on"
    assert all(torch.isfinite(p).all() for p in model.parameters()), "the bad step is not applied"


# --- resume ----------------------------------------------------------------------------------

def resumable_training(path, epochs=4, interrupt_after=None):
    """A training with shuffling, augmentation, Adam, one-cycle and weight decay; optionally interrupted."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (96, 3, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 10, (96,))
    gen = torch.Generator().manual_seed(1)
    train = DeviceLoader(x, y, 16, seed=2, transform=Preprocess(augment=True, generator=gen))
    model = small_cnn()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=epochs * len(train))

    class Interrupt(Callback):
        order = 200  # after Resume has saved the epoch

        def after_epoch(self):
            if interrupt_after is not None and self.learner.epoch + 1 == interrupt_after:
                raise KeyboardInterrupt

    lrn = Learner(model, train, optimizer=opt, scheduler=sched, callbacks=[Resume(path), Interrupt()])
    lrn.fit(epochs)
    return model, lrn


def test_an_interrupted_training_resumes_to_the_same_final_weights(tmp_path):
    reference, ref_lrn = resumable_training(tmp_path / "uninterrupted.pt")
    path = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        resumable_training(path, interrupt_after=2)
    assert path.is_file()
    torch.manual_seed(123)  # whatever the generators did meanwhile, resuming restores them
    resumed, lrn = resumable_training(path)
    assert [r["epoch"] for r in lrn.history] == [1, 2, 3, 4]
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b), "resuming must reproduce the uninterrupted run exactly"
    assert lrn.history == ref_lrn.history or [r["train_loss"] for r in lrn.history] == pytest.approx(
        [r["train_loss"] for r in ref_lrn.history])


def test_resume_refuses_the_state_of_another_training(tmp_path):
    path = tmp_path / "state.pt"
    resumable_training(path, epochs=2)
    with pytest.raises(RuntimeError, match="another training"):
        resumable_training(path, epochs=3)


def test_rng_state_round_trip():
    state = rng_state()
    a = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(a, torch.rand(3))


SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_step import resumable_training
    from fasttrain.train import Callback
    import fasttrain.train as train

    class Slow(Callback):
        order = 300
        def after_epoch(self):
            print("epoch", self.learner.epoch + 1, flush=True)
            time.sleep(float(sys.argv[2]))

    original = train.Learner.add_callbacks
    train.Learner.add_callbacks = lambda self, cbs: original(self, [*cbs, Slow()])
    model, lrn = resumable_training(sys.argv[1])
    torch.save(model.state_dict(), sys.argv[1] + ".final")
    print("done", flush=True)
""")


def test_a_killed_training_process_resumes_when_run_again(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=os.path.dirname(__file__)))
    state = tmp_path / "state.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(state), "30"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().split() == ["epoch", "1"]
        deadline = time.time() + 30
        while not state.exists() and time.time() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert state.exists()
    out = subprocess.run([sys.executable, str(script), str(state), "0"], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert "Resumed" in out and "epoch 1\n" not in out and "done" in out
    reference = tmp_path / "reference.pt"  # the same training, uninterrupted, in the same kind of process
    subprocess.run([sys.executable, str(script), str(reference), "0"], capture_output=True, text=True, env=env,
                   check=True)
    for a, b in zip(torch.load(str(reference) + ".final").values(), torch.load(str(state) + ".final").values()):
        assert torch.equal(a, b)
