"""Chapter 4 (ResNet): the library's residual nets and recipe, the exercises' grading, the smoke run."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chapters import execute_chapter
from grading import edit_solution, grade_variants, solution_source
from fasttrain.batches import DeviceLoader
from fasttrain.costs import count_parameters
from fasttrain.resnet import (RECIPE, ResidualBlock, end_convs, he_schedule, plain_net, recipe_learner,
                              residual_net, resnet9, resnet9_channels, train_degradation_net)
from fasttrain.train import Callback

SLUG = "04_resnet"


# --- fasttrain.resnet: the models ------------------------------------------------------------

def test_resnet9_has_6_573_130_parameters_at_full_width_and_412_954_at_quarter_width():
    assert count_parameters(resnet9()) == 6_573_130
    assert count_parameters(resnet9(0.25)) == 412_954


def test_resnet9_channels_scale_with_the_width_multiplier():
    assert resnet9_channels(1.0) == (64, 128, 256, 512)
    assert resnet9_channels(0.25) == (16, 32, 64, 128)
    assert resnet9_channels(0.5) == (32, 64, 128, 256)


@pytest.mark.parametrize("width", [0, -1.0])
def test_resnet9_refuses_a_width_that_is_not_positive(width):
    with pytest.raises(ValueError, match="width must be a positive multiplier"):
        resnet9(width)


def test_resnet9_outputs_one_logit_per_class_for_any_image_size():
    net = resnet9(0.25, num_classes=7).eval()
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert net(torch.randn(1, 3, 40, 24)).shape == (1, 7)


def test_residual_block_shortcut_is_identity_when_the_shape_is_kept_and_a_projection_otherwise():
    assert isinstance(ResidualBlock(8, 8).shortcut, nn.Identity)
    for block in (ResidualBlock(8, 16), ResidualBlock(8, 8, stride=2)):
        conv = block.shortcut[0]
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is None
    x = torch.randn(2, 8, 10, 10)
    assert ResidualBlock(8, 16, stride=2)(x).shape == (2, 16, 5, 5)


def test_residual_block_with_its_branch_zeroed_passes_the_input_and_its_gradient():
    block = ResidualBlock(6, 6).eval()
    with torch.no_grad():
        for p in block.branch.parameters():
            p.zero_()
    x = torch.randn(3, 6, 5, 5, requires_grad=True)
    out = block(x)
    assert torch.equal(out, torch.relu(x))
    out.sum().backward()
    assert torch.equal(x.grad, (x > 0).float())


def test_residual_block_refuses_a_stride_other_than_1_or_2():
    with pytest.raises(ValueError, match="stride 1 or 2"):
        ResidualBlock(4, 4, stride=3)


def _weight_layers(model: nn.Module) -> int:
    """3x3 convolutions plus linear layers: the layers He et al. count (1x1 projections are not counted)."""
    return sum(1 for m in model.modules()
               if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)))


@pytest.mark.parametrize("depth", [8, 20, 56])
def test_plain_and_residual_nets_have_depth_weight_layers_and_differ_only_by_the_projections(depth):
    plain, resid = plain_net(depth, width=4), residual_net(depth, width=4)
    assert _weight_layers(plain) == _weight_layers(resid) == depth
    projections = [m for m in resid.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert len(projections) == 2  # at the two stage changes
    extra = sum(p.numel() for conv in projections for p in conv.parameters()) + 2 * (8 + 16)  # + their BNs
    assert count_parameters(resid) - count_parameters(plain) == extra
    x = torch.randn(2, 3, 16, 16)
    assert plain(x).shape == resid(x).shape == (2, 10)


@pytest.mark.parametrize("depth", [7, 10, 2])
def test_plain_net_refuses_a_depth_that_is_not_6n_plus_2(depth):
    with pytest.raises(ValueError, match="6n\\+2"):
        plain_net(depth)


def test_residual_net_builds_its_blocks_with_the_class_it_is_given():
    class Counted(ResidualBlock):
        made = []

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            Counted.made.append((*args, kwargs.get("stride", 1)))

    net = residual_net(14, width=4, block=Counted)
    assert len(Counted.made) == 6 and all(isinstance(m, Counted) for m in net if isinstance(m, ResidualBlock))
    assert [a[-1] for a in Counted.made] == [1, 1, 2, 1, 2, 1]  # stride 2 at each new stage


def test_he_schedule_divides_the_rate_by_10_at_half_and_three_quarters_of_the_steps():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4)
    schedule = he_schedule(opt, 20)
    rates = []
    for _ in range(20):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert rates[:10] == [0.4] * 10
    assert rates[10:15] == pytest.approx([0.04] * 5) and rates[15:] == pytest.approx([0.004] * 5)


def _degradation_data(n=192, size=8):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=gen)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long() + 2 * (x[:, 1].mean(dim=(1, 2)) > 0).long()
    return x, y


def test_train_degradation_net_measures_the_loss_at_even_steps_and_the_gradients_during_training():
    torch.manual_seed(0)
    x, y = _degradation_data()
    model = plain_net(8, width=4)
    first, last = end_convs(model)
    assert first is model[0][0] and last.out_channels == 16
    out = train_degradation_net(model, x, y, x[:64], y[:64], steps=30, batch=16, lr=0.05, seed=3, evals=5,
                                grad_samples=4)
    assert out["steps"] == [0, 6, 12, 18, 24, 30] and len(out["loss"]) == len(out["acc"]) == 6
    assert out["grad_steps"] == [0, 10, 19, 29] and len(out["grad_first"]) == len(out["grad_last"]) == 4
    assert all(g > 0 for g in out["grad_first"] + out["grad_last"])
    assert out["final_loss"] == out["loss"][-1] < out["loss"][0]  # it learns the four-class rule
    assert not out["diverged"] and out["lr"] == 0.05 and out["seed"] == 3


def test_train_degradation_net_gives_the_same_batches_for_the_same_seed_and_other_ones_for_another():
    x, y = _degradation_data()
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(0)  # the same initial weights every time
        runs.append(train_degradation_net(plain_net(8, width=4), x, y, x, y, steps=8, batch=16, lr=0.05, seed=seed,
                                          evals=2, grad_samples=2))
    assert runs[0]["loss"] == runs[1]["loss"]
    assert runs[0]["loss"][-1] != runs[2]["loss"][-1]


def test_train_degradation_net_reports_a_loss_that_blows_up_as_diverged():
    class Blows(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x).mean(dim=(2, 3)) * float("inf")

    x, y = _degradation_data(32)
    out = train_degradation_net(Blows(), x, y % 4, x, y % 4, steps=5, batch=8, lr=0.1, seed=0, evals=1, grad_samples=2)
    assert out["diverged"] and out["final_loss"] != out["final_loss"]  # NaN


# --- fasttrain.resnet: the recipe ------------------------------------------------------------

class _RecordLR(Callback):
    def before_fit(self):
        self.lrs = []

    def before_batch(self):
        if self.learner.training:
            self.lrs.append(self.learner.optimizer.param_groups[0]["lr"])


def test_recipe_learner_runs_adam_with_one_cycle_over_all_steps_and_value_clipping():
    torch.manual_seed(0)
    x, y = torch.randn(40, 3, 8, 8), torch.randint(0, 10, (40,))
    data = DeviceLoader(x, y, batch_size=10, seed=0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    probe = _RecordLR()
    learner = recipe_learner(model, data, epochs=3, callbacks=[probe])
    assert isinstance(learner.optimizer, torch.optim.Adam)
    assert learner.optimizer.param_groups[0]["weight_decay"] == RECIPE["weight_decay"] == 1e-4
    assert learner.step.clip_value == RECIPE["grad_clip"] == 0.1 and learner.step.clip_norm is None
    assert isinstance(learner.scheduler, torch.optim.lr_scheduler.OneCycleLR)
    history = learner.fit(3)
    assert len(probe.lrs) == 12  # 3 epochs x 4 batches, one schedule step each
    assert max(probe.lrs) == pytest.approx(RECIPE["max_lr"], rel=0.05)
    assert probe.lrs[0] == pytest.approx(RECIPE["max_lr"] / 25)  # OneCycleLR's default div_factor
    assert probe.lrs[-1] < RECIPE["max_lr"] / 1000  # annealed to almost zero by the last step
    assert all("seconds" in r for r in history)


def test_recipe_learner_refuses_training_data_without_batches():
    empty = DeviceLoader(torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long), batch_size=4)
    with pytest.raises(ValueError, match="no batches"):
        recipe_learner(nn.Linear(2, 2), empty)


# --- the exercises agree with the library ----------------------------------------------------

def _exercise_namespace() -> dict:
    """Run the chapter's solution cells (and the helper they need) in a fresh namespace."""
    import nbformat

    from grading import ROOT

    nb = nbformat.read(str(ROOT / "solutions" / SLUG / f"{SLUG}.ipynb"), as_version=4)
    helper = next(c.source for c in nb.cells if c.cell_type == "code" and c.source.startswith("def conv_bn_relu"))
    ns = {"torch": torch, "nn": nn, "F": F}
    for source in (solution_source(SLUG, "residual_block"), helper, solution_source(SLUG, "resnet9")):
        exec(source, ns)
    return ns


def _copy_by_order(src: nn.Module, dst: nn.Module) -> None:
    """Load src's parameters and buffers into dst in order (the module names may differ)."""
    s, d = src.state_dict(), dst.state_dict()
    assert [v.shape for v in s.values()] == [v.shape for v in d.values()]
    dst.load_state_dict(dict(zip(d.keys(), s.values())))


@pytest.mark.parametrize("args", [(8, 8, 1), (8, 16, 2), (8, 8, 2)])
def test_exercise_residual_block_computes_what_the_library_block_does(args):
    ns = _exercise_namespace()
    torch.manual_seed(0)
    theirs, ours = ns["ResidualBlock"](*args), ResidualBlock(*args)
    _copy_by_order(ours, theirs)
    x = torch.randn(2, args[0], 8, 8)
    assert torch.allclose(theirs(x), ours(x))  # training mode: batch statistics
    assert torch.allclose(theirs.eval()(x), ours.eval()(x))


def test_the_block_tests_reference_computation_agrees_with_the_library_block():
    ns = _exercise_namespace()
    import nbformat

    from grading import ROOT

    nb = nbformat.read(str(ROOT / "solutions" / SLUG / f"{SLUG}.ipynb"), as_version=4)
    exec(next(c.source for c in nb.cells if c.get("id") == "cell-006"), ns)
    for args, shape in (((8, 8, 1), (2, 8, 6, 6)), ((3, 5, 2), (1, 3, 7, 9))):
        block = ns["scramble_norms"](ResidualBlock(*args)).eval()
        x = torch.randn(*shape)
        assert torch.allclose(ns["expected_output"](block, x, args[2]), block(x), atol=1e-5)


@pytest.mark.parametrize("width", [1.0, 0.25])
def test_exercise_resnet9_computes_what_the_library_resnet9_does(width):
    ns = _exercise_namespace()
    torch.manual_seed(0)
    theirs, ours = ns["resnet9"](width), resnet9(width)
    assert count_parameters(theirs) == count_parameters(ours)
    _copy_by_order(ours, theirs)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(theirs.eval()(x), ours.eval()(x), atol=1e-5)


# --- grading with real nbgrader --------------------------------------------------------------

def _edit(grade_id: str, old: str, new: str) -> dict[str, str]:
    """A wrong variant of solution cell `grade_id`: `old` replaced by `new`."""
    return {grade_id: edit_solution(SLUG, grade_id, old, new)}


PROJECTION = "nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)"
FIRST_CONV = "nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)"
SECOND_CONV = "nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)"
FORWARD = "torch.relu(self.branch(x) + self.shortcut(x))"
WRONG = {
    # The block forgets to add the shortcut: a plain two-conv stack.
    "block_without_shortcut": _edit("residual_block", FORWARD, "torch.relu(self.branch(x))"),
    # The shortcut is always the identity: x cannot be added when the shape changes.
    "shortcut_always_identity": _edit("residual_block", "if stride == 1 and in_channels == out_channels:",
                                      "if True:"),
    # The projection forgets the stride: right channels, twice the height and width.
    "projection_without_stride": _edit("residual_block", PROJECTION,
                                       "nn.Conv2d(in_channels, out_channels, 1, bias=False)"),
    # ResNet-9 with its residual blocks replaced by two plain convs (same parameter count, no skips).
    "resnet9_without_skips": _edit("resnet9", "ResidualBlock(c2, c2),\n        conv_bn_relu(c2, c3",
                                   "conv_bn_relu(c2, c2),\n        conv_bn_relu(c2, c2),\n        conv_bn_relu(c2, c3"),
    # New (issue 13): the stride in the second conv of the branch: same shapes, same parameters.
    "stride_in_second_conv": {"residual_block": edit_solution(SLUG, "residual_block", FIRST_CONV, FIRST_CONV.replace(
        "stride=stride, ", "")).replace(SECOND_CONV, "nn.Conv2d(out_channels, out_channels, 3, stride=stride, padding=1, "
                                                     "bias=False)")},
    # A ReLU at the end of the branch, before the addition (relu(relu(F) + x)): same shapes and parameters.
    "relu_before_addition": _edit("residual_block", "nn.BatchNorm2d(out_channels),\n        )\n        if stride",
                                  "nn.BatchNorm2d(out_channels),\n            nn.ReLU(),\n        )\n        if stride"),
    # The addition done in place on the shortcut's output, which for an identity shortcut is the caller's x.
    "shortcut_added_in_place": _edit("residual_block", "return " + FORWARD,
                                     "out = self.shortcut(x)\n        out += self.branch(x)\n        return torch.relu(out)"),
    # ResNet-9 with a global average pool in the head: same parameters and shapes, another network.
    "resnet9_avgpool_head": _edit("resnet9", "nn.AdaptiveMaxPool2d(1)", "nn.AdaptiveAvgPool2d(1)"),
    # The first max-pool after the prep conv instead of layer 1's conv: every later shape is the same.
    "resnet9_pool_on_prep": _edit("resnet9", "conv_bn_relu(3, c1),\n        conv_bn_relu(c1, c2, pool=True),",
                                  "conv_bn_relu(3, c1, pool=True),\n        conv_bn_relu(c1, c2),"),
    # ResNet-9 built from the library's residual blocks instead of the student's.
    "resnet9_library_blocks": _edit("resnet9", "    return nn.Sequential(",
                                    "    from fasttrain.resnet import ResidualBlock\n    return nn.Sequential("),
}
TESTS = ("test_residual_block_shapes", "test_residual_block_skip", "test_residual_block_order", "test_resnet9_shapes",
         "test_resnet9_layers", "test_resnet9_trains")
LOSES = {  # variant: the tests it must fail (and every other test it must pass)
    "block_without_shortcut": {"test_residual_block_skip", "test_residual_block_order", "test_resnet9_trains"},
    "shortcut_always_identity": {"test_residual_block_shapes", "test_residual_block_skip", "test_residual_block_order"},
    "projection_without_stride": {"test_residual_block_shapes", "test_residual_block_skip", "test_residual_block_order"},
    "resnet9_without_skips": {"test_resnet9_shapes", "test_resnet9_layers"},
    "stride_in_second_conv": {"test_residual_block_order"},
    "relu_before_addition": {"test_residual_block_order"},
    "shortcut_added_in_place": {"test_residual_block_skip", "test_residual_block_order", "test_resnet9_trains"},
    "resnet9_avgpool_head": {"test_resnet9_layers"},
    "resnet9_pool_on_prep": {"test_resnet9_layers"},
    "resnet9_library_blocks": {"test_resnet9_shapes", "test_resnet9_layers"},
}


@pytest.fixture(scope="module")
def scores():
    return grade_variants(SLUG, WRONG, timeout=120)


def test_solution_gets_full_marks(scores):
    assert scores["solution"]["total"] == scores["solution"]["max"] == 12


def test_blank_student_copy_scores_zero(scores):
    assert scores["blank"]["total"] == 0


def test_grading_reports_no_tampering_and_no_changed_checksums(scores):
    assert "has changed" not in scores.log and "Tampering" not in scores.log, scores.log[-3000:]


@pytest.mark.parametrize("variant", sorted(LOSES))
def test_typical_mistake_loses_the_points_of_its_tests_and_keeps_the_others(scores, variant):
    got = scores[variant]
    lost = {t for t in TESTS if got[t] == 0}
    assert lost == LOSES[variant], f"{variant} should fail exactly {sorted(LOSES[variant])}: {got}"
    assert all(got[t] == 2 for t in TESTS if t not in LOSES[variant]), got


# --- the tests that cannot be talked round (in process: cheaper than nbgrader) -------------------

def _test_cell(grade_id: str) -> str:
    import nbformat

    from grading import ROOT

    nb = nbformat.read(str(ROOT / "solutions" / SLUG / f"{SLUG}.ipynb"), as_version=4)
    return next(c.source for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)


def _namespace_with(block_source: str | None = None, resnet9_source: str | None = None) -> dict:
    """The chapter's exercises (solutions unless replaced), test helpers and Integrity, as the graded notebook has them."""
    import nbformat

    from fasttrain.checks import Integrity
    from grading import ROOT

    nb = nbformat.read(str(ROOT / "solutions" / SLUG / f"{SLUG}.ipynb"), as_version=4)
    ns = {"torch": torch, "nn": nn, "F": F, "integrity": Integrity()}
    by_id = {c.get("id"): c.source for c in nb.cells}
    for cid, replacement in (("residual_block", block_source), ("cell-006", None), ("cell-015", None),
                             ("resnet9", resnet9_source), ("resnet9-helpers", None)):
        exec(replacement or by_id[cid], ns)
    return ns


def test_a_block_that_inherits_the_library_block_fails_the_order_test():
    ns = _namespace_with(block_source="import fasttrain.resnet\n\n\nclass ResidualBlock(fasttrain.resnet.ResidualBlock):\n"
                                      "    pass\n")
    exec(_test_cell("test_residual_block_shapes"), ns)  # it computes the right thing ...
    with pytest.raises(AssertionError, match="derives from fasttrain.resnet.ResidualBlock"):
        exec(_test_cell("test_residual_block_order"), ns)  # ... but it is not written


def test_a_resnet9_that_returns_the_library_network_fails_its_tests():
    ns = _namespace_with(resnet9_source="def resnet9(width=1.0, num_classes=10):\n    import fasttrain.resnet\n"
                                        "    return fasttrain.resnet.resnet9(width, num_classes)\n")
    with pytest.raises(AssertionError, match="two residual blocks"):
        exec(_test_cell("test_resnet9_shapes"), ns)
    with pytest.raises(AssertionError):
        exec(_test_cell("test_resnet9_layers"), ns)


def test_a_replaced_allclose_does_not_pass_the_block_tests():
    original = torch.allclose  # before the student's cell replaces it (the namespace runs that cell)
    try:
        ns = _namespace_with(block_source=solution_source(SLUG, "residual_block").replace(
            "return torch.relu(self.branch(x) + self.shortcut(x))", "return torch.relu(self.branch(x))")
            + "\ntorch.allclose = lambda *args, **kwargs: True\n")
        with pytest.raises(AssertionError, match="replaced"):
            exec(_test_cell("test_residual_block_skip"), ns)
    finally:
        torch.allclose = original


# --- the smoke run ---------------------------------------------------------------------------

def test_smoke_run_reaches_its_targets_and_records_them():
    _, record = execute_chapter(SLUG)
    assert record["chapter"] == SLUG and record["profile"] == "smoke"
    assert record["passed"] is True, record
    metrics = {m["metric"]: m for m in record["metrics"]}
    assert {"degradation_plain_gap", "degradation_skip_gain", "resnet9_test_accuracy", "resnet9_train_seconds",
            "train_set_load_seconds", "resnet34_vgg19_flops_ratio", "vgg19_fc_flop_share"} <= set(metrics)
    assert metrics["vgg19_fc_flop_share"]["value"] < 0.01  # the fully connected layers are under 1% of VGG-19's FLOPs
    assert all(m["passed"] for m in metrics.values() if m["passed"] is not None)
    assert record["extra"]["recipe"]["max_lr"] == 0.01
