"""Chapter 7 (local complexity): the library's LC measure, the regions picture, and the chapter's exercises."""

from __future__ import annotations

import copy

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from torch import nn

from chapters import execute_chapter
from fasttrain.local_complexity import (LocalComplexityMonitor, StackedMLP, count_sign_changes, cross_polytope,
                                        first_layer_closed_form, local_complexity, log_spaced_steps,
                                        orthonormal_directions)
from fasttrain.regions import activation_patterns, count_regions, plot_regions, region_ids
from grading import edit_solution, grade_variants, solution_namespace

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
    assert [x for x, _ in board.rows] == [1, 6], "the board gets step + 1 (a log axis cannot show step 0)"
    assert set(board.rows[0][1]) == {"lc_train", "lc_random", "acc"}
    steps, values = mon.series("lc_train")
    assert steps.tolist() == [0, 5] and values[0] == values[1]


def test_monitor_as_a_learner_callback_measures_at_step_zero_and_after_chosen_steps():
    from fasttrain.train import Learner

    torch.manual_seed(0)
    model = random_mlp(8, 16, 3, 0, dtype=torch.float32)
    batches = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(4)]
    mon = LocalComplexityMonitor({"train": batches[0][0]}, r=0.3, steps=[0, 2, 7], n_directions=4)
    Learner(model, batches, callbacks=[mon]).fit(2)
    assert [h["step"] for h in mon.history] == [0, 2, 7]
    assert model.training, "measuring must leave the model in training mode during fit"


# --- several MLPs trained at once -----------------------------------------------------------------

def digits_like_mlp(seed: int, batchnorm: bool = False, width: int = 7) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, width), *([nn.BatchNorm1d(width)] if batchnorm else []), nn.ReLU(),
                         nn.Linear(width, width), *([nn.BatchNorm1d(width)] if batchnorm else []), nn.ReLU(),
                         nn.Linear(width, 3))


@pytest.mark.parametrize("batchnorm", [False, True])
def test_stack_computes_what_each_member_computes(batchnorm):
    nets = [digits_like_mlp(s, batchnorm) for s in range(3)]
    stack = StackedMLP(nets)
    x = torch.randn(3, 16, 5)
    out = stack(x)
    assert out.shape == (3, 16, 3)
    for i, net in enumerate(nets):
        assert torch.allclose(out[i], net(x[i]), atol=1e-6), f"member {i} differs in training mode"
    stack.eval()
    for net in nets:
        net.eval()
    assert torch.allclose(stack(x)[1], nets[1](x[1]), atol=1e-6), "eval mode uses each member's running statistics"
    shared = torch.randn(16, 5)
    assert torch.allclose(stack(shared)[2], nets[2](shared), atol=1e-6), "an (N, d) input goes to every member"
    assert len(list(stack.parameters())) == len(list(nets[0].parameters())), "the layout copy must not be trained"


def test_stack_trains_each_member_as_if_alone():
    nets = [digits_like_mlp(s) for s in range(3)]
    stack = StackedMLP([copy.deepcopy(n) for n in nets])
    x, y = torch.randn(3, 16, 5), torch.randn(3, 16, 3)
    opt = torch.optim.AdamW(stack.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        ((stack(x) - y) ** 2).mean(dim=(1, 2)).sum().backward()
        opt.step()
    for i, net in enumerate(nets):
        alone = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
        for _ in range(3):
            alone.zero_grad()
            torch.nn.functional.mse_loss(net(x[i]), y[i]).backward()
            alone.step()
        member = stack.member(i)
        for (name, a), b in zip(member.state_dict().items(), net.state_dict().values()):
            assert torch.allclose(a, b, atol=1e-5), f"member {i}, {name}"


def test_stack_member_is_a_copy_with_batchnorm_statistics_and_mode():
    nets = [digits_like_mlp(s, batchnorm=True) for s in range(2)]
    stack = StackedMLP(nets)
    stack(torch.randn(2, 32, 5))  # updates every member's running statistics
    member = stack.member(1)
    assert isinstance(member, nn.Sequential) and member.training
    assert not torch.equal(member[1].running_mean, torch.zeros(7)), "running statistics must come along"
    with torch.no_grad():
        member[0].weight.zero_()
    assert not torch.equal(stack.member(1)[0].weight, member[0].weight), "member() must return a copy"
    assert not stack.eval().member(0).training


def test_stack_rejects_networks_of_different_layouts_or_sizes():
    with pytest.raises(ValueError, match="one layout"):
        StackedMLP([digits_like_mlp(0), digits_like_mlp(1, batchnorm=True)])
    with pytest.raises(ValueError, match="same sizes"):
        StackedMLP([digits_like_mlp(0, width=7), digits_like_mlp(1, width=8)])
    with pytest.raises(ValueError, match=r"\(2, N, d\)"):
        StackedMLP([digits_like_mlp(0), digits_like_mlp(1)])(torch.randn(3, 4, 5))


def test_local_complexity_of_a_member_is_that_of_the_network_it_came_from():
    nets = [digits_like_mlp(s, batchnorm=True) for s in range(2)]
    stack = StackedMLP(nets)
    x = torch.randn(40, 5)
    v = orthonormal_directions(5, 3, seed=1)
    assert torch.equal(local_complexity(stack.member(1), x, 0.3, directions=v), local_complexity(nets[1], x, 0.3, directions=v))


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
    assert count_regions(model, xlim=(-1, 1), ylim=(-1, 1), resolution=64) == 4
    assert count_regions(model, xlim=(0.1, 1), ylim=(0.1, 1), resolution=64) == 1, "only the window's regions count"


def test_count_regions_sees_what_plot_regions_draws():
    import matplotlib.pyplot as plt

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(50, 2)
    fig, ax = plt.subplots()
    drawn = plot_regions(model, ax, x, resolution=120)
    plt.close(fig)
    assert count_regions(model, x, resolution=120) == drawn > 4


# --- the exercises agree with the library ---------------------------------------------------------

@pytest.fixture(scope="module")
def exercises():
    """The chapter's solution cells, executed: random_orthonormal_directions, cross_polytope_vertices, ..."""
    namespace = {"torch": torch, "nn": nn}
    solution_namespace(SLUG, ("cross_polytope", "count_sign_changes", "mlp_lc"), namespace)
    return namespace


def test_exercise_lc_agrees_with_the_library_on_a_deep_mlp(exercises):
    model = random_mlp(64, 80, 4, 5)
    x = torch.rand(60, 64, dtype=torch.float64) * (torch.rand(60, 64, dtype=torch.float64) > 0.6)
    v = exercises["random_orthonormal_directions"](64, 12, seed=2)
    assert torch.allclose(v @ v.T, torch.eye(12, dtype=torch.float64), atol=1e-12)
    assert torch.equal(exercises["cross_polytope_vertices"](x, v, 0.2), cross_polytope(x, v, 0.2))
    assert torch.equal(exercises["mlp_local_complexity"](model, x, v, 0.2).double(),
                       local_complexity(model, x, 0.2, directions=v).double())


def test_exercise_sign_count_agrees_with_the_library(exercises):
    pre = torch.randn(20, 8, 5, 3, 3)
    assert torch.equal(exercises["count_sign_changes"](pre.flatten(2)), count_sign_changes(pre))


# --- grading: real nbgrader on the solution, the blank copy and typical mistakes --------------------

def _edit(grade_id: str, old: str, new: str) -> dict[str, str]:
    """A wrong variant of solution cell `grade_id`: `old` replaced by `new`."""
    return {grade_id: edit_solution(SLUG, grade_id, old, new)}


def _edits(grade_id: str, *pairs: tuple[str, str]) -> dict[str, str]:
    """A wrong variant of solution cell `grade_id` with several (old, new) replacements."""
    src = edit_solution(SLUG, grade_id, *pairs[0])
    for old, new in pairs[1:]:
        assert old in src, f"{old!r} not found in {grade_id}: update this test"
        src = src.replace(old, new)
    return {grade_id: src}


QR = "q, _ = torch.linalg.qr(torch.randn(dim, n, generator=gen, dtype=torch.float64))\n    return q.T"
HOOKS = ("outputs = []\n    handles = [m.register_forward_hook(lambda module, inputs, out: outputs.append(out)) "
         "for m in hidden]")
WRONG = {
    # Random unit vectors, not orthogonalised.
    "unit_not_orthogonal": _edit("cross_polytope", QR,
                                 "g = torch.randn(n, dim, generator=gen, dtype=torch.float64)\n"
                                 "    return g / g.norm(dim=1, keepdim=True)"),
    # Raw Gaussian directions: neither unit length nor orthogonal.
    "raw_gaussian_directions": _edit("cross_polytope", QR,
                                     "return torch.randn(n, dim, generator=gen, dtype=torch.float64)"),
    # Only the vertices x + r v_p, no mirrored x - r v_p.
    "only_plus_vertices": _edit("cross_polytope",
                                "torch.cat([x[:, None, :] + step, x[:, None, :] - step], dim=1)",
                                "x[:, None, :] + step"),
    # Counting after the ReLU by value: a neuron that is on at every vertex counts when its value varies.
    "count_relu_values": _edit("count_sign_changes", "signs = torch.sign(pre)", "signs = torch.relu(pre)"),
    # Hooks that read each hidden linear layer's input (the previous ReLU's output, or the raw input).
    "hooks_after_relu": _edit("mlp_lc", "outputs.append(out)", "outputs.append(inputs[0])"),
    # The output layer counted too.
    "counts_output_layer": _edit("mlp_lc", "list(dict.fromkeys(linears[:-1]))", "list(dict.fromkeys(linears))"),
    # New: the directions drawn from the global random generator, so the seed does nothing.
    "ignores_seed": _edit("cross_polytope", "torch.randn(dim, n, generator=gen, dtype=torch.float64)",
                          "torch.randn(dim, n, dtype=torch.float64)"),
    # New: only the first and the last vertex compared (x + r v_1 against x - r v_P).
    "compares_two_vertices": _edit("count_sign_changes", "(signs != signs[:, :1]).any(dim=1).sum(dim=-1)",
                                   "(signs[:, 0] != signs[:, -1]).sum(dim=-1)"),
    # New: each layer's output reshaped vertex-major, (2P, B, N): the vertices of different points mixed up.
    "reshape_vertex_major": _edit("mlp_lc", "out.reshape(x.shape[0], n_vertices, -1)",
                                  "out.reshape(n_vertices, x.shape[0], -1).transpose(0, 1)"),
    # New: one output kept per module (a dict, as in the authors' script): a layer called twice counts once.
    "shared_layer_counted_once": _edits("mlp_lc", (HOOKS, "outputs = {}\n    handles = [m.register_forward_hook("
                                                          "lambda module, inputs, out: outputs.__setitem__(module, out)) "
                                                          "for m in hidden]"),
                                        ("for out in outputs:", "for out in outputs.values():")),
    # New: the hooks removed after the forward pass, not in a finally block: a failing pass leaves them behind.
    "hooks_removed_without_finally": _edit("mlp_lc", "    try:\n        with torch.no_grad():\n"
                                                     "            model(vertices.reshape(-1, x.shape[1]))\n"
                                                     "    finally:\n        for h in handles:\n            h.remove()",
                                           "    with torch.no_grad():\n        model(vertices.reshape(-1, x.shape[1]))\n"
                                           "    for h in handles:\n        h.remove()"),
}
TESTS = ("test_cross_polytope", "test_count_sign_changes", "test_mlp_lc")


@pytest.fixture(scope="module")
def scores():
    return grade_variants(SLUG, WRONG, timeout=60)


def test_solution_gets_full_marks(scores):
    assert scores["solution"]["total"] == scores["solution"]["max"] == 7, scores["solution"]


def test_blank_student_copy_scores_zero(scores):
    assert scores["blank"]["total"] == 0, scores["blank"]


def test_grading_logs_no_tampering_or_changed_cells(scores):
    assert "has changed" not in scores.log and "Tampering" not in scores.log, scores.log[-3000:]


@pytest.mark.parametrize("variant,test_id", [
    ("unit_not_orthogonal", "test_cross_polytope"),
    ("raw_gaussian_directions", "test_cross_polytope"),
    ("only_plus_vertices", "test_cross_polytope"),
    ("count_relu_values", "test_count_sign_changes"),
    ("hooks_after_relu", "test_mlp_lc"),
    ("counts_output_layer", "test_mlp_lc"),
    ("ignores_seed", "test_cross_polytope"),
    ("compares_two_vertices", "test_count_sign_changes"),
    ("reshape_vertex_major", "test_mlp_lc"),
    ("shared_layer_counted_once", "test_mlp_lc"),
    ("hooks_removed_without_finally", "test_mlp_lc"),
])
def test_typical_mistake_loses_the_points_of_its_test(scores, variant, test_id):
    s = scores[variant]
    assert s[test_id] == 0, f"{variant} should fail {test_id}: {s}"
    earlier = TESTS[:TESTS.index(test_id)]  # later exercises build on earlier ones, earlier ones must not suffer
    assert all(s[k] > 0 for k in earlier), f"{variant} should not lose the points of {earlier}: {s}"


def test_non_orthonormal_directions_cost_only_the_cross_polytope_points(scores):
    s = scores["unit_not_orthogonal"]
    assert s["test_count_sign_changes"] > 0 and s["test_mlp_lc"] > 0, s


# --- the smoke run ----------------------------------------------------------------------------------

def test_smoke_run_is_exact_against_the_closed_form_and_finishes():
    _, record = execute_chapter(SLUG)
    assert record["chapter"] == SLUG and record["profile"] == "smoke"
    assert record["passed"] is True, record
    assert record["threads"] == 1, "the chapter runs on one CPU thread (a recorded choice)"
    metrics = {m["metric"]: m for m in record["metrics"]}
    assert metrics["lc_first_layer_mismatches"]["value"] == 0
    assert metrics["grok_steps_completed"]["value"] == 1
    runs = record["extra"]["runs"]
    assert set(runs) == {"plain", "batchnorm", "noisy labels"}
    seeds = record["settings"]["grok_seeds"]
    assert all(len(rows) == seeds for rows in runs.values()), "one summary per seed and variant"
    assert {s["seed"] for s in runs["plain"]} == {s["seed"] for s in runs["batchnorm"]}, "the variants share seeds"
    assert len(record["extra"]["moons"]) >= 2 and len(record["extra"]["moons"][0]["lc_data"]) == 3
