"""fasttrain.device, and the profiles of fasttrain.runtime."""

import pytest
import torch

import fasttrain.device as device_module
from fasttrain.device import (Timer, autocast, autocast_dtype, check_same_device, get_device, has_amx_bf16,
                              seed_everything)
from fasttrain.runtime import resolve_profile


def test_auto_device_is_cpu_without_accelerators_and_is_named(capsys):
    dev = get_device("auto")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert dev.type == expected
    assert "Using device" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error():
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        get_device("cuda")


def test_seed_everything_repeats_random_draws():
    seed_everything(3)
    a = torch.randn(5)
    seed_everything(3)
    assert torch.equal(a, torch.randn(5))


def test_cpu_has_no_autocast_dtype_and_autocast_is_a_no_op():
    assert autocast_dtype("cpu") is None
    with autocast("cpu"):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32


def test_a_cpu_autocasts_to_bf16_only_when_asked_and_only_with_amx(monkeypatch):
    """The fastest recipe asks for bf16 on a CPU (AMX runs bf16 convolutions 2 to 3.5 times faster); the chapters
    do not ask, so their CPU numbers stay fp32 whatever the CPU's generation."""
    for amx in (True, False):
        monkeypatch.setattr(device_module, "has_amx_bf16", lambda amx=amx: amx)
        assert autocast_dtype("cpu") is None
        assert autocast_dtype("cpu", cpu=True) == (torch.bfloat16 if amx else None)
        with autocast("cpu", cpu=True):
            y = torch.ones(2, 2) @ torch.ones(2, 2)
        assert y.dtype == (torch.bfloat16 if amx else torch.float32)
    monkeypatch.undo()
    assert isinstance(has_amx_bf16(), bool)


def test_a_train_step_asked_for_cpu_autocast_trains_in_bf16_on_amx_and_fp32_elsewhere(monkeypatch):
    from fasttrain.step import TrainStep

    for amx in (True, False):
        monkeypatch.setattr(device_module, "has_amx_bf16", lambda amx=amx: amx)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 30 * 30, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        step = TrainStep(model, opt, mixed_precision=True, device="cpu", cpu_autocast=True)
        preds, loss = step.forward(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
        assert preds.dtype == (torch.bfloat16 if amx else torch.float32) and step.scaler is None
        assert TrainStep(model, opt, mixed_precision=True, device="cpu").dtype is None  # not asked: fp32


def test_timer_measures_elapsed_seconds():
    with Timer("cpu") as t:
        sum(range(10000))
    assert 0 < t.seconds < 5


def test_model_and_batch_on_different_devices_is_a_loud_error():
    model = torch.nn.Linear(2, 2).to("meta")
    with pytest.raises(RuntimeError, match="model is on meta but the batch is on cpu"):
        check_same_device(model, torch.ones(1, 2))


@pytest.mark.parametrize("name,expected", [("smoke", "smoke"), ("cpu", "cpu"), ("full", "full")])
def test_known_profiles_resolve_to_themselves(name, expected):
    assert resolve_profile(name) == expected


def test_auto_profile_is_full_on_cuda_and_smoke_elsewhere():
    assert resolve_profile("auto", torch.device("cpu")) == "smoke"
    assert resolve_profile("auto", torch.device("cuda")) == "full"


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown profile 'fast'.*smoke.*cpu.*full.*auto"):
        resolve_profile("fast")
