"""fasttrain.checks: tests that a submission cannot talk round."""

import pytest
import torch

from fasttrain.checks import (OPTIMIZER_APIS, Integrity, TamperingError, TripwireTriggered,
                              assert_written_from_scratch, tripwires)


def test_integrity_notices_a_replaced_comparison_and_compares_with_the_original(monkeypatch):
    integrity = Integrity()
    a, b = torch.zeros(3), torch.ones(3)
    monkeypatch.setattr(torch, "allclose", lambda *args, **kwargs: True)
    assert torch.allclose(a, b)
    with pytest.raises(TamperingError, match="torch.allclose was replaced"):
        integrity.allclose(a, b)
    monkeypatch.undo()
    assert integrity.allclose(a, a) and not integrity.allclose(a, b)


def test_a_subclass_of_the_library_twin_is_refused():
    class Lazy(torch.optim.Adam):
        pass

    with pytest.raises(AssertionError, match="derives from torch.optim.adam.Adam"):
        assert_written_from_scratch(Lazy, torch.optim.Adam, torch.optim.AdamW)
    assert_written_from_scratch(torch.optim.Optimizer, torch.optim.Adam)


def test_tripwires_fail_a_call_to_torchs_optimizer_and_are_removed_after():
    import torch.optim.adam as adam_module
    from torch.optim.adam import adam as taken_early  # a reference taken before the tripwires

    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    original = torch.optim.Adam.step
    with tripwires(*OPTIMIZER_APIS) as fired:
        with pytest.raises(TripwireTriggered, match="torch.optim.Adam.step"):
            torch.optim.Adam([p]).step()
        with pytest.raises(TripwireTriggered, match="torch.optim.adam.adam"):
            adam_module.adam([p], [p.grad], [torch.zeros(2)], [torch.zeros(2)], [], [torch.tensor(1.0)],
                                  beta1=0.9, beta2=0.999, lr=0.1, weight_decay=0.0, eps=1e-8, maximize=False,
                                  amsgrad=False)
        with pytest.raises(TripwireTriggered, match="_single_tensor_adam"):
            taken_early([p], [p.grad], [torch.zeros(2)], [torch.zeros(2)], [], [torch.tensor(1.0)], foreach=False,
                        beta1=0.9, beta2=0.999, lr=0.1, weight_decay=0.0, eps=1e-8, maximize=False, amsgrad=False)
    assert fired[:2] == ["torch.optim.Adam.step", "torch.optim.adam.adam"]
    assert torch.optim.Adam.step is original


def test_tripwires_on_an_inherited_method_leave_the_subclass_as_it_was():
    # torch.optim.AdamW inherits Adam.step; wiring both must not pin Adam's tripwire onto AdamW afterwards.
    had_own = "step" in vars(torch.optim.AdamW)
    before = torch.optim.AdamW.step
    with tripwires("torch.optim.Adam.step", "torch.optim.AdamW.step"):
        pass
    assert ("step" in vars(torch.optim.AdamW)) == had_own
    assert torch.optim.AdamW.step is before
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    torch.optim.AdamW([p], lr=0.1).step()  # no TripwireTriggered
    assert p.detach().lt(1).all()
