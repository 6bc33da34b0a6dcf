"""Chapter 3 (VGG blocks): the cost counters and the VGG net of the library, the exercises' grading, the smoke run."""

import nbformat
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from chapters import execute_chapter
from grading import ROOT, edit_solution, grade_variants, solution_namespace, solution_source
from fasttrain.costs import (format_costs, layer_costs, param_counts, receptive_field, receptive_fields,
                             total_macs)
from fasttrain.vgg import VGG_CIFAR, VGG_SMALL, VGGNet, materialize, vgg_block, vgg_net

SLUG = "03_vgg"

# Published receptive fields (Araujo, Norris and Sim, Distill 2019), as (kernel, stride) stacks.
VGG16_STACK = [layer for n in (2, 2, 3, 3, 3) for layer in [(3, 1)] * n + [(2, 2)]]
ALEXNET_STACK = [(11, 4), (3, 2), (5, 1), (3, 2), (3, 1), (3, 1), (3, 1), (3, 2)]


def _flops(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


# --- fasttrain.costs: parameters ------------------------------------------------------------

def test_param_counts_match_torch_for_every_layer_of_the_vgg_net():
    net = vgg_net(VGG_CIFAR)
    counts = param_counts(net)
    for name, module in net.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        assert counts.get(name, 0) == own, name
    assert sum(counts.values()) == sum(p.numel() for p in net.parameters())


def test_param_counts_of_a_biased_conv_include_one_bias_per_output_channel():
    counts = param_counts(nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.Linear(512, 10)))
    assert counts == {"0": 64 * 3 * 9 + 64, "1": 2 * 64, "2": 512 * 10 + 10}


def test_param_counts_refuses_a_lazy_model_that_has_seen_no_input():
    with pytest.raises(ValueError, match="not materialized"):
        param_counts(VGGNet(VGG_SMALL))


def test_three_3x3_convs_hold_27_c_squared_weights_and_one_7x7_holds_49():
    c = 32
    stack = nn.Sequential(*[nn.Conv2d(c, c, 3, padding=1, bias=False) for _ in range(3)])
    assert sum(param_counts(stack).values()) == 27 * c * c
    assert sum(param_counts(nn.Conv2d(c, c, 7, bias=False)).values()) == 49 * c * c


# --- fasttrain.costs: receptive fields ------------------------------------------------------

def test_receptive_field_of_three_3x3_convs_equals_one_7x7():
    three = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)])
    assert receptive_field(three) == receptive_field(nn.Sequential(nn.Conv2d(8, 8, 7))) == 7


def test_receptive_fields_of_vgg16_and_alexnet_match_published_values():
    assert receptive_field(VGG16_STACK) == 212
    assert receptive_field(ALEXNET_STACK) == 195


def test_receptive_field_walks_modules_like_tuples_and_ignores_pointwise_layers():
    net = vgg_net(VGG_CIFAR)
    as_tuples = [(m.kernel_size[0] if isinstance(m, nn.Conv2d) else m.kernel_size,
                  m.stride[0] if isinstance(m, nn.Conv2d) else m.stride)
                 for m in net.features.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d))]
    steps = receptive_fields(net.features)
    assert [s.field for s in steps] == [receptive_field(as_tuples[:i + 1]) for i in range(len(as_tuples))]
    assert steps[-1].field == 76 and steps[-1].jump == 16


def test_receptive_field_counts_dilation_and_rejects_layers_it_cannot_reason_about():
    assert receptive_field([nn.Conv2d(1, 1, 3, dilation=2), nn.Conv2d(1, 1, 3, dilation=4)]) == 13
    with pytest.raises(TypeError, match="net.features"):
        receptive_field(nn.Sequential(nn.Conv2d(1, 1, 3), nn.Flatten(), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="kernel, stride"):
        receptive_field([(3,)])


# --- fasttrain.costs: multiply-accumulates and memory ---------------------------------------

def test_conv_macs_are_output_positions_times_kernel_volume_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16 * 16, 10))
    rows = {r.name: r for r in layer_costs(model, torch.zeros(2, 3, 32, 32))}
    assert rows["0"].macs == 2 * 16 * 16 * 16 * (3 * 3 * 3)
    assert rows["3"].macs == 2 * 10 * 4096
    assert rows["1"].macs == 0 and rows["0"].out_shape == (2, 16, 16, 16)


@pytest.mark.parametrize("model,shape", [
    (vgg_net(VGG_SMALL), (2, 3, 32, 32)),
    (vgg_net(VGG_SMALL, head="flatten"), (3, 3, 32, 32)),
    (nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 6, (3, 1), stride=(2, 1)), nn.Flatten(),
                   nn.LazyLinear(5)), (2, 4, 11, 9)),
])
def test_mac_counter_matches_torch_flop_counter_mode(model, shape):
    x = torch.randn(shape)
    model(x)  # materialize any lazy layer
    assert 2 * total_macs(model, x) == _flops(model, x)


def test_layer_costs_leaves_no_hooks_keeps_the_training_mode_and_the_batchnorm_statistics():
    net = vgg_net(VGG_SMALL)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    layer_costs(net, torch.randn(4, 3, 32, 32))
    assert net.training
    assert all(not m._forward_hooks for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_activation_bytes_are_the_output_size_times_the_element_size():
    rows = {r.name: r for r in layer_costs(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)).double(),
                                           torch.zeros(5, 3, 10, 10, dtype=torch.float64))}
    assert rows["0"].activation_bytes == 5 * 8 * 10 * 10 * 8


def test_doubling_width_while_halving_resolution_keeps_the_macs_per_layer_constant():
    rows = [r for r in layer_costs(vgg_net(VGG_CIFAR), torch.zeros(1, 3, 32, 32)) if r.kind == "Conv2d"]
    second_convs = rows[1::2]
    assert len({r.macs for r in second_convs}) == 1
    assert [r.activation_bytes for r in second_convs] == [second_convs[0].activation_bytes // 2 ** i for i in range(4)]
    assert "total" in format_costs(rows)


# --- fasttrain.vgg --------------------------------------------------------------------------

def test_vgg_block_keeps_resolution_in_its_convs_and_halves_it_in_the_pool():
    block = vgg_block(3, 24)
    out = block(torch.zeros(2, 5, 16, 16))
    assert out.shape == (2, 24, 8, 8)
    convs = [m for m in block if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 and all(c.bias is None for c in convs)  # BatchNorm follows: no bias needed
    assert sum(isinstance(m, nn.BatchNorm2d) for m in block) == 3
    plain = vgg_block(1, 4, batch_norm=False, pool=False)
    assert plain[0].bias is not None and plain(torch.zeros(1, 2, 6, 6)).shape == (1, 4, 6, 6)


def test_vgg_net_gap_head_sees_one_number_per_channel_and_flatten_head_the_whole_map():
    gap, flat = vgg_net(VGG_CIFAR, head="gap"), vgg_net(VGG_CIFAR, head="flatten")
    assert gap.head[-1].in_features == 512 and flat.head[-1].in_features == 512 * 2 * 2
    assert gap(torch.zeros(3, 3, 32, 32)).shape == flat(torch.zeros(3, 3, 32, 32)).shape == (3, 10)


def test_vgg_net_dropout_option_sits_before_the_linear_layer():
    net = vgg_net(VGG_SMALL, dropout=0.3)
    drops = [m for m in net.head if isinstance(m, nn.Dropout)]
    assert len(drops) == 1 and drops[0].p == 0.3


def test_vgg_net_rejects_bad_options_with_clear_messages():
    with pytest.raises(ValueError, match="gap"):
        VGGNet(VGG_SMALL, head="mean")
    with pytest.raises(ValueError, match="dropout"):
        VGGNet(VGG_SMALL, dropout=1.5)
    with pytest.raises(ValueError, match="at least one"):
        vgg_block(0, 8)


def test_materialize_sizes_lazy_layers_without_touching_batchnorm_statistics():
    net = materialize(VGGNet(VGG_SMALL))
    assert not any(isinstance(p, nn.parameter.UninitializedParameter) for p in net.parameters())
    assert all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
               for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert net.training


def test_vgg_net_fits_a_small_batch():
    torch.manual_seed(0)
    net = vgg_net(VGG_SMALL)
    x, y = torch.randn(20, 3, 32, 32), torch.arange(20) % 10
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(40):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    assert (net(x).argmax(1) == y).float().mean() == 1.0


# --- the exercises agree with the library ---------------------------------------------------

@pytest.fixture(scope="module")
def exercise():
    """The chapter's three solution functions, executed from the source notebook."""
    namespace = {"torch": torch, "nn": nn}
    solution_namespace(SLUG, ("layer_params", "receptive_field", "count_macs"), namespace)
    return namespace


def test_exercise_parameter_count_agrees_with_the_library(exercise):
    net = vgg_net(VGG_CIFAR, head="flatten")
    counts = param_counts(net)
    for name, module in net.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            assert exercise["layer_params"](module) == counts[name], name


def test_exercise_receptive_field_agrees_with_the_library(exercise):
    for stack in (VGG16_STACK, ALEXNET_STACK, [(3, 1, 2), (5, 2)], []):
        assert exercise["receptive_field"](stack) == receptive_field(stack)


def test_exercise_mac_count_agrees_with_the_library(exercise):
    net, x = vgg_net(VGG_CIFAR), torch.zeros(2, 3, 32, 32)
    library = {r.name: r.macs for r in layer_costs(net, x) if r.macs}
    assert exercise["count_macs"](net, x) == library


# --- grading: real nbgrader on the solution, the blank copy and typical wrong answers --------

def _edit(grade_id: str, old: str, new: str) -> dict[str, str]:
    """A wrong variant of solution cell `grade_id`: `old` replaced by `new`."""
    return {grade_id: edit_solution(SLUG, grade_id, old, new)}


WRONG = {
    # Forgets the biases of convolutions and linear layers.
    "params_forget_bias": {"layer_params": solution_source(SLUG, "layer_params")
                           .replace("return weights + (layer.out_channels if layer.bias is not None else 0)",
                                    "return weights")
                           .replace("return layer.out_features * layer.in_features + "
                                    "(layer.out_features if layer.bias is not None else 0)",
                                    "return layer.out_features * layer.in_features")},
    # Counts BatchNorm's running mean and variance as parameters.
    "params_count_bn_buffers": _edit("layer_params", "return 2 * layer.num_features if layer.affine else 0",
                                     "return 4 * layer.num_features"),
    # Adds the kernel sizes without the stride product (the jump).
    "field_without_stride_product": _edit("receptive_field", "field += (kernel - 1) * dilation * jump",
                                          "field += (kernel - 1) * dilation"),
    # Updates the jump before the field: the layer's own stride wrongly widens its own window.
    "field_jump_updated_first": _edit("receptive_field",
                                      "field += (kernel - 1) * dilation * jump\n        jump *= stride",
                                      "jump *= stride\n        field += (kernel - 1) * dilation * jump"),
    # Counts a conv's MACs without the output's spatial size (its weights, per image).
    "macs_without_output_size": _edit("count_macs", "output.numel() * per_output",
                                      "output.shape[0] * output.shape[1] * per_output"),
    # Uses the input's spatial size instead of the output's (right only for stride 1 and same padding).
    "macs_input_size": _edit("count_macs", "output.numel() * per_output",
                             "(output.numel() if output.ndim == 2 else output.shape[0] * output.shape[1] "
                             "* inputs[0].shape[-2] * inputs[0].shape[-1]) * per_output"),
    # Leaves the hooks attached after counting.
    "macs_hooks_left_attached": _edit("count_macs", "        for h in handles:\n            h.remove()",
                                      "        pass"),
}


@pytest.fixture(scope="module")
def scores():
    return grade_variants(SLUG, WRONG, timeout=60)


def test_solution_gets_full_marks(scores):
    assert scores["solution"]["total"] == scores["solution"]["max"] == 10


def test_blank_student_copy_scores_zero(scores):
    assert scores["blank"]["total"] == 0


TESTS = ("test_layer_params", "test_receptive_field", "test_count_macs")


@pytest.mark.parametrize("variant,test_id", [
    ("params_forget_bias", "test_layer_params"),
    ("params_count_bn_buffers", "test_layer_params"),
    ("field_without_stride_product", "test_receptive_field"),
    ("field_jump_updated_first", "test_receptive_field"),
    ("macs_without_output_size", "test_count_macs"),
    ("macs_input_size", "test_count_macs"),
    ("macs_hooks_left_attached", "test_count_macs"),
])
def test_typical_mistake_loses_the_points_of_its_test(scores, variant, test_id):
    s = scores[variant]
    assert s[test_id] == 0, f"{variant} should fail {test_id}: {s}"
    assert all(s[k] > 0 for k in TESTS if k != test_id), f"{variant} should lose only {test_id}'s points: {s}"


# --- the smoke run -----------------------------------------------------------------------------

def test_source_notebook_is_committed_without_outputs():
    nb = nbformat.read(str(ROOT / "solutions" / SLUG / f"{SLUG}.ipynb"), as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_smoke_run_reaches_its_targets_and_records_the_ablation():
    _, record = execute_chapter(SLUG)
    assert record["chapter"] == SLUG and record["profile"] == "smoke"
    assert record["passed"] is True, record
    metrics = {m["metric"]: m for m in record["metrics"]}
    assert set(metrics) == {"test_accuracy"} and metrics["test_accuracy"]["passed"]
    ablation = record["extra"]["ablation"]
    assert set(ablation) == {"all ingredients", "no augmentation", "no weight decay", "no label smoothing",
                             "flatten instead of GAP"}
    assert all(0.0 <= row["test_acc"] <= 1.0 for row in ablation.values())
