"""Chapter 4 (ResNet): the library's residual nets and recipe, the exercises' grading, the smoke run."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chapters import execute_chapter
from grading import edit_solution, grade_variants, solution_source
from fasttrain.batches import DeviceLoader
from fasttrain.costs import count_parameters
from fasttrain.resnet import (RECIPE, ResidualBlock, plain_net, recipe_learner, residual_net,
                              resnet9, resnet9_channels)
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
WRONG = {
    # The block forgets to add the shortcut: a plain two-conv stack.
    "block_without_shortcut": _edit("residual_block", "torch.relu(self.branch(x) + self.shortcut(x))",
                                    "torch.relu(self.branch(x))"),
    # The shortcut is always the identity: x cannot be added when the shape changes.
    "shortcut_always_identity": _edit("residual_block", "if stride == 1 and in_channels == out_channels:",
                                      "if True:"),
    # The projection forgets the stride: right channels, twice the height and width.
    "projection_without_stride": _edit("residual_block", PROJECTION,
                                       "nn.Conv2d(in_channels, out_channels, 1, bias=False)"),
    # ResNet-9 with its residual blocks replaced by two plain convs (same parameter count, no skips).
    "resnet9_without_skips": _edit("resnet9", "ResidualBlock(c2, c2),\n        conv_bn_relu(c2, c3",
                                   "conv_bn_relu(c2, c2),\n        conv_bn_relu(c2, c2),\n        conv_bn_relu(c2, c3"),
}
TESTS = ("test_residual_block_shapes", "test_residual_block_skip", "test_resnet9_shapes", "test_resnet9_trains")


@pytest.fixture(scope="module")
def scores():
    return grade_variants(SLUG, WRONG, timeout=120)


def test_solution_gets_full_marks(scores):
    assert scores["solution"]["total"] == scores["solution"]["max"] == 8


def test_blank_student_copy_scores_zero(scores):
    assert scores["blank"]["total"] == 0


@pytest.mark.parametrize("variant,test_id", [
    ("block_without_shortcut", "test_residual_block_skip"),
    ("block_without_shortcut", "test_resnet9_trains"),
    ("shortcut_always_identity", "test_residual_block_shapes"),
    ("projection_without_stride", "test_residual_block_shapes"),
    ("resnet9_without_skips", "test_resnet9_shapes"),
])
def test_typical_mistake_loses_the_points_of_its_test(scores, variant, test_id):
    assert scores[variant][test_id] == 0, f"{variant} should fail {test_id}: {scores[variant]}"


@pytest.mark.parametrize("variant", ["shortcut_always_identity", "projection_without_stride"])
def test_a_wrong_shortcut_shape_costs_nothing_in_the_resnet9_exercise(scores, variant):
    # ResNet-9's blocks keep their shape, so a student is not marked down twice for one mistake.
    s = scores[variant]
    assert s["test_resnet9_shapes"] == 2 and s["test_resnet9_trains"] == 2, s


def test_resnet9_without_skips_keeps_the_residual_block_points(scores):
    s = scores["resnet9_without_skips"]
    assert s["test_residual_block_shapes"] == 2 and s["test_residual_block_skip"] == 2, s


# --- the smoke run ---------------------------------------------------------------------------

def test_smoke_run_reaches_its_targets_and_records_them():
    _, record = execute_chapter(SLUG)
    assert record["chapter"] == SLUG and record["profile"] == "smoke"
    assert record["passed"] is True, record
    metrics = {m["metric"]: m for m in record["metrics"]}
    assert {"degradation_plain_gap", "degradation_skip_gain", "resnet9_test_accuracy",
            "resnet9_train_seconds", "train_set_load_seconds"} <= set(metrics)
    assert all(m["passed"] for m in metrics.values() if m["passed"] is not None)
    assert record["extra"]["recipe"]["max_lr"] == 0.01
