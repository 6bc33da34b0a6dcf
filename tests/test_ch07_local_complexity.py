"""Chapter 7 (local complexity): the library's LC measure, the regions picture, and the chapter's exercises."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from torch import nn

from fasttrain.local_complexity import (LocalComplexityMonitor, count_sign_changes, cross_polytope,
                                        first_layer_closed_form, local_complexity, log_spaced_steps,
                                        orthonormal_directions)
from fasttrain.regions import activation_patterns, plot_regions, region_ids

SLUG = "07_local_complexity"


def random_mlp(d_in: int, width: int, depth: int, seed: int, dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    layers, d = [], d_in
    for _ in range(depth - 1):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, 3))
    return nn.Sequential(*layers).to(dtype)


# --- the measure -------------------------------------------------------------------------------

def test_directions_are_orthonormal_and_repeatable():
    v = orthonormal_directions(64, 64, seed=3, dtype=torch.float64)
    assert torch.allclose(v @ v.T, torch.eye(64, dtype=torch.float64), atol=1e-12)
    assert torch.equal(v, orthonormal_directions(64, 64, seed=3, dtype=torch.float64))
    assert not torch.allclose(v, orthonormal_directions(64, 64, seed=4, dtype=torch.float64))


def test_directions_reject_more_than_the_dimension():
    with pytest.raises(ValueError, match="at most 5 directions"):
        orthonormal_directions(5, 6)


def test_cross_polytope_has_mirrored_vertices_at_distance_r():
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    v = orthonormal_directions(12, 5, dtype=torch.float64)
    verts = cross_polytope(x, v, 0.7)
    assert verts.shape == (4, 10, 3, 2, 2)
    offsets = (verts - x[:, None]).reshape(4, 10, 12)
    assert torch.allclose(offsets[:, :5], 0.7 * v.expand(4, 5, 12))
    assert torch.allclose(offsets[:, 5:], -0.7 * v.expand(4, 5, 12))


def test_count_sign_changes_counts_neurons_not_vertices():
    pre = torch.tensor([[[1.0, -2.0, 3.0], [2.0, -1.0, -3.0], [0.5, 1.0, -1.0]]])  # 1 point, 3 vertices, 3 neurons
    assert count_sign_changes(pre).tolist() == [2]


@pytest.mark.parametrize("seed", range(10))
def test_first_layer_count_equals_closed_form_on_random_mlps(seed):
    model = random_mlp(12, 40, 3, seed)
    x = torch.randn(200, 12, dtype=torch.float64)
    v = orthonormal_directions(12, 6, seed=seed, dtype=torch.float64)
    counts = local_complexity(model, x, r=0.4, directions=v, per_layer=True)
    assert counts.shape == (200, 2)
    assert torch.equal(counts[:, 0], first_layer_closed_form(model[0], x, v, 0.4))


def test_conv_first_layer_count_equals_closed_form_of_its_dense_matrix():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=1).double()
    model = nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).double()
    model[1].running_mean.zero_()
    model[1].running_var.fill_(1.0)
    x = torch.randn(30, 2, 5, 5, dtype=torch.float64)
    dense = nn.Linear(50, 100).double()
    with torch.no_grad():
        basis = torch.eye(50, dtype=torch.float64).reshape(50, 2, 5, 5)
        bias_map = conv(torch.zeros(1, 2, 5, 5, dtype=torch.float64)).reshape(-1)
        dense.weight.copy_((conv(basis).reshape(50, -1) - bias_map).T)
        dense.bias.copy_(bias_map)
    v = orthonormal_directions(50, 8, seed=1, dtype=torch.float64)
    lc = local_complexity(model, x, r=0.3, directions=v)
    assert torch.equal(lc, first_layer_closed_form(dense, x, v, 0.3).double())
    assert model.training, "local_complexity must give the model back in the mode it found it"


def test_local_complexity_is_the_same_for_any_batch_size():
    model = random_mlp(8, 30, 4, 1)
    x = torch.randn(50, 8, dtype=torch.float64)
    assert torch.equal(local_complexity(model, x, 0.5, 4, batch_size=7), local_complexity(model, x, 0.5, 4, batch_size=64))


def test_local_complexity_explains_a_model_without_activation_modules():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.fc(x))

    with pytest.raises(ValueError, match="nn.ReLU"):
        local_complexity(Functional(), torch.randn(3, 4), 0.1, 2)


def test_log_spaced_steps_start_at_zero_and_end_at_last():
    steps = log_spaced_steps(10_000, 30)
    assert steps[0] == 0 and steps[-1] == 10_000 and steps == sorted(set(steps))


def test_monitor_measures_at_the_chosen_steps_and_logs_to_the_board():
    class Board:
        def __init__(self):
            self.rows = []

        def log(self, x, **values):
            self.rows.append((x, values))

    model = random_mlp(8, 16, 3, 0, dtype=torch.float32)
    board = Board()
    mon = LocalComplexityMonitor({"train": torch.randn(20, 8), "random": torch.rand(10, 8)}, r=0.3, steps=[0, 5],
                                 n_directions=4, board=board, metrics=lambda m: {"acc": 0.5})
    measured = [s for s in range(8) if mon.maybe_measure(model, s) is not None]
    assert measured == [0, 5]
    assert [x for x, _ in board.rows] == [0, 5]
    assert set(board.rows[0][1]) == {"lc_train", "lc_random", "acc"}
    steps, values = mon.series("lc_train")
    assert steps.tolist() == [0, 5] and values[0] == values[1]


# --- the regions picture -------------------------------------------------------------------------

def test_regions_of_a_hand_built_network_are_its_quadrants():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
    pts = torch.tensor([[1.0, 1.0], [2.0, 3.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -2.0]])
    patterns, _ = activation_patterns(model, pts)
    assert patterns.tolist() == [[True, True], [True, True], [False, True], [False, False], [True, False]]
    ids = region_ids(patterns)
    assert ids[0] == ids[1] and len(set(ids.tolist())) == 4
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    assert plot_regions(model, ax, xlim=(-1, 1), ylim=(-1, 1), resolution=64) == 4
    plt.close(fig)
