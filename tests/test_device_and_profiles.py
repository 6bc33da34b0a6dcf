"""fasttrain.device, and the profiles of fasttrain.runtime."""

import pytest
import torch

from fasttrain.device import Timer, autocast, autocast_dtype, check_same_device, get_device, seed_everything
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
