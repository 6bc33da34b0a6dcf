"""Chapter 3 (VGG blocks): the cost counters, the VGG net and the ablation tools of the library, the exercises'
grading, the untouched student notebook, the smoke run."""

import math

import nbformat
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from chapters import execute_chapter
from grading import ROOT, edit_solution, grade_variants, solution_namespace, solution_source
from fasttrain.costs import (format_costs, layer_costs, param_counts, receptive_field, receptive_fields,
                             total_macs)
from fasttrain.step import NonFiniteLossError
from fasttrain.vgg import (VGG_CIFAR, VGG_QUARTER, VGG_SMALL, RunStore, VGGNet, compare, format_mean_spread,
                           format_summaries, materialize, mean_confidence, mean_spread, plot_summaries, run_key,
                           summarize, tune_and_repeat, vgg_block, vgg_net)

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


class _TwiceThrough(nn.Module):
    """One conv applied twice, a 1x3 conv between (a layer called twice, a non-square kernel)."""

    def __init__(self):
        super().__init__()
        self.shared, self.wide = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, (1, 3), padding=(0, 1))

    def forward(self, x):
        return self.shared(self.wide(self.shared(x)))


def test_layer_costs_of_a_layer_called_twice_add_up_and_match_the_flop_counter():
    model, x = _TwiceThrough(), torch.randn(3, 4, 5, 7)
    rows = {r.name: r for r in layer_costs(model, x)}
    one_call = 3 * 4 * 5 * 7 * 9 * 4
    assert rows["shared"].macs == 2 * one_call and rows["wide"].macs == 3 * 4 * 5 * 7 * 3 * 4
    assert rows["shared"].activation_bytes == 2 * 3 * 4 * 5 * 7 * 4
    assert rows["shared"].params == 4 * 4 * 9 + 4
    assert 2 * total_macs(model, x) == _flops(model, x)


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


def test_quarter_width_net_has_vgg_cifars_four_blocks_at_a_quarter_of_the_width():
    net = vgg_net(VGG_QUARTER)
    widths = [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [c // 4 for _, c in VGG_CIFAR] == [16, 32, 64, 128]
    assert net.head[-1].in_features == 128 and vgg_net(VGG_QUARTER, head="flatten").head[-1].in_features == 512


def test_vgg_net_without_batchnorm_gives_every_conv_a_bias():
    net = vgg_net(VGG_SMALL, batch_norm=False)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert all(c.bias is not None for c in convs)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


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


# --- fasttrain.vgg: the ablation's tools ---------------------------------------------------------

def _scripted(scores: dict, diverge: tuple = ()):
    """A training that returns a validation score per rate (the best one not at the first rate) and logs its calls."""
    calls = []

    def train(lr, seed):
        calls.append((lr, seed))
        if lr in diverge:
            raise NonFiniteLossError("The training loss became nan at epoch 1, step 3; training stopped.")
        return {"val_acc": scores[lr], "test_acc": scores[lr] - 0.01 * seed}
    return train, calls


def test_tune_and_repeat_sweeps_with_the_first_seed_then_repeats_the_best_rate():
    train, calls = _scripted({1e-3: 0.4, 3e-3: 0.6, 1e-2: 0.5})
    out = tune_and_repeat(train, [1e-3, 3e-3, 1e-2], [7, 8, 9], name="x")
    assert calls == [(1e-3, 7), (3e-3, 7), (1e-2, 7), (3e-3, 8), (3e-3, 9)]
    assert out["lr"] == 3e-3 and not out["at_edge"]
    assert [r["seed"] for r in out["runs"]] == [7, 8, 9] and all(r["lr"] == 3e-3 for r in out["runs"])
    assert out["rates"] == {1e-3: 0.4, 3e-3: 0.6, 1e-2: 0.5}


def test_tune_and_repeat_scores_a_diverged_rate_as_the_worst_and_flags_a_rate_at_the_edge():
    train, _ = _scripted({1e-3: 0.4, 3e-3: 0.5, 1e-2: 0.9}, diverge=(1e-2,))
    out = tune_and_repeat(train, [1e-3, 3e-3, 1e-2], [0, 1])
    assert out["lr"] == 3e-3 and out["at_edge"] and out["rates"][1e-2] is None
    train, _ = _scripted({1e-3: 0.4}, diverge=(1e-3,))
    with pytest.raises(NonFiniteLossError, match="every rate"):
        tune_and_repeat(train, [1e-3], [0])


def test_tune_and_repeat_extends_the_grid_past_a_best_rate_at_its_edge():
    train, calls = _scripted({1e-3: 0.4, 2e-3: 0.5, 4e-3: 0.6, 8e-3: 0.7, 1.6e-2: 0.65})
    out = tune_and_repeat(train, [1e-3, 2e-3, 4e-3], [0, 1], extend=2)
    assert calls == [(1e-3, 0), (2e-3, 0), (4e-3, 0), (8e-3, 0), (1.6e-2, 0), (8e-3, 1)]
    assert out["lr"] == 8e-3 and not out["at_edge"] and list(out["rates"]) == [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]
    train, calls = _scripted({5e-4: 0.7, 1e-3: 0.6, 2e-3: 0.5, 4e-3: 0.4})
    out = tune_and_repeat(train, [1e-3, 2e-3, 4e-3], [0], extend=1)  # downwards too; one step only
    assert out["lr"] == 5e-4 and out["at_edge"] and calls[-1] == (5e-4, 0)
    train, calls = _scripted({1e-3: 0.4, 3e-3: 0.5, 1e-2: 0.9}, diverge=(1e-2,))
    out = tune_and_repeat(train, [1e-3, 3e-3, 1e-2], [0], extend=2)  # next to a diverged rate: no extension
    assert len(calls) == 3 and out["lr"] == 3e-3 and out["at_edge"]


def test_tune_and_repeat_resumes_from_its_store_without_training_again(tmp_path):
    train, calls = _scripted({1e-3: 0.4, 3e-3: 0.6})
    first = tune_and_repeat(train, [1e-3, 3e-3], [0, 1], name="a", store=RunStore(tmp_path / "s.json"))
    again, calls_again = _scripted({1e-3: 0.0, 3e-3: 0.0})
    second = tune_and_repeat(again, [1e-3, 3e-3], [0, 1], name="a", store=RunStore(tmp_path / "s.json"))
    assert len(calls) == 3 and calls_again == [] and second == first
    store = RunStore()
    store.put(run_key("b", 3e-3, 0), {"val_acc": 0.9})
    third, calls_third = _scripted({1e-3: 0.4, 3e-3: 0.6})
    assert tune_and_repeat(third, [1e-3, 3e-3], [0], name="b", store=store)["lr"] == 3e-3
    assert calls_third == [(1e-3, 0)]


def test_mean_spread_summarize_and_compare_judge_a_difference_by_its_standard_error():
    assert mean_spread([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert math.isnan(mean_spread([4.0])[1])
    a = summarize([{"gap": g} for g in (0.10, 0.12, 0.11)], ["gap"])["gap"]
    b = summarize([{"gap": g} for g in (0.40, 0.45, 0.35)], ["gap"])["gap"]
    close = summarize([{"gap": g} for g in (0.09, 0.14, 0.12)], ["gap"])["gap"]
    assert a["n"] == 3 and a["values"] == [0.10, 0.12, 0.11]
    c = compare(a, b)
    assert c["clear"] is True and c["diff"] == pytest.approx(0.29)
    assert c["se"] == pytest.approx(math.sqrt(0.01 ** 2 / 3 + 0.05 ** 2 / 3))
    assert compare(a, close)["clear"] is False
    single = summarize([{"gap": 0.5}], ["gap"])["gap"]
    assert compare(a, single)["clear"] is None


def test_format_summaries_writes_mean_plus_minus_sd_and_extra_columns():
    s = {"all": summarize([{"acc": 0.5}, {"acc": 0.7}], ["acc"]), "one": summarize([{"acc": 0.25}], ["acc"])}
    table = format_summaries(s, {"acc": "accuracy"}, extra={"rate": {"all": "0.004"}})
    lines = table.splitlines()
    assert lines[0] == "| setting | rate | accuracy |"
    assert lines[2] == "| all | 0.004 | 0.600 ± 0.141 |" and lines[3] == "| one |  | 0.250 |"
    assert format_mean_spread(s["all"]["acc"], ".2f") == "0.60 ± 0.14"


def test_plot_summaries_draws_error_bars_and_a_dot_per_seed():
    import matplotlib
    matplotlib.use("Agg", force=True)
    s = {"a": summarize([{"x": 1.0}, {"x": 2.0}, {"x": 3.0}], ["x"]), "b": summarize([{"x": 1.0}], ["x"])}
    fig = plot_summaries(s, {"x": "metric x"}, title="t")
    ax = fig.axes[0]
    dots = [line for line in ax.lines if line.get_marker() == "."]
    assert sum(len(line.get_xdata()) for line in dots) == 4
    assert any(c.__class__.__name__ == "ErrorbarContainer" for c in ax.containers)


def test_mean_confidence_is_the_mean_top_probability():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert mean_confidence(logits, torch.tensor([0, 1])).item() == pytest.approx((0.5 + 0.75) / 2)


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
    for net, x in ((vgg_net(VGG_CIFAR), torch.zeros(2, 3, 32, 32)), (_TwiceThrough(), torch.zeros(3, 4, 5, 7))):
        library = {r.name: r.macs for r in layer_costs(net, x) if r.macs}
        assert exercise["count_macs"](net, x) == library


# --- grading: real nbgrader on the solution, the blank copy and typical wrong answers --------

def _edit(grade_id: str, old: str, new: str) -> str:
    """Solution cell `grade_id` with `old` replaced by `new` (a typical mistake)."""
    return edit_solution(SLUG, grade_id, old, new)


def _signature(grade_id: str) -> str:
    """The first two lines of a solution cell (its def and docstring), to build a variant with another body."""
    return "\n".join(solution_source(SLUG, grade_id).splitlines()[:2])


# Mistakes students make, packed one per exercise into each submission so that the whole set grades in
# one autograde call: {submission: ({grade_id: source}, the tests it must fail)}. Every other test keeps its points.
WRONG = {
    # Forgets the biases of convolutions and linear layers; adds the kernel sizes without the jump (the product
    # of the strides so far); counts a conv's weights per image instead of weights times output positions.
    "bias_forgotten_no_jump_no_output_size": ({
        "layer_params": solution_source(SLUG, "layer_params")
        .replace("return weights + (layer.out_channels if layer.bias is not None else 0)", "return weights")
        .replace("return layer.out_features * layer.in_features + (layer.out_features if layer.bias is not None else 0)",
                 "return layer.out_features * layer.in_features"),
        "receptive_field": _edit("receptive_field", "field += (kernel - 1) * dilation * jump",
                                 "field += (kernel - 1) * dilation"),
        "count_macs": _edit("count_macs", "output.numel() * per_output",
                            "output.shape[0] * output.shape[1] * per_output"),
    }, {"test_layer_params", "test_receptive_field", "test_count_macs"}),
    # Counts BatchNorm's running mean and variance as parameters; updates the jump before the field (a layer's
    # own stride widens its own window); takes the input's spatial size (right only for stride 1, same padding).
    "bn_buffers_jump_first_input_size": ({
        "layer_params": _edit("layer_params", "return 2 * layer.num_features if layer.affine else 0",
                              "return 4 * layer.num_features"),
        "receptive_field": _edit("receptive_field", "field += (kernel - 1) * dilation * jump\n        jump *= stride",
                                 "jump *= stride\n        field += (kernel - 1) * dilation * jump"),
        "count_macs": _edit("count_macs", "output.numel() * per_output",
                            "(output.numel() if output.ndim == 2 else output.shape[0] * output.shape[1] "
                            "* inputs[0].shape[-2] * inputs[0].shape[-1]) * per_output"),
    }, {"test_layer_params", "test_receptive_field", "test_count_macs"}),
    # New: a square kernel assumed (kernel_size[0] squared); the layer's own stride instead of the jump.
    # Old: the hooks left attached after counting.
    "square_kernel_own_stride_hooks_left": ({
        "layer_params": _edit("layer_params", "kh, kw = layer.kernel_size", "kh = kw = layer.kernel_size[0]"),
        "receptive_field": _edit("receptive_field", "field += (kernel - 1) * dilation * jump",
                                 "field += (kernel - 1) * dilation * stride"),
        "count_macs": _edit("count_macs", "        for h in handles:\n            h.remove()", "        pass"),
    }, {"test_layer_params", "test_receptive_field", "test_count_macs"}),
    # New: torch's own count instead of the formula; dilation applied to the kernel (k*d - 1 instead of
    # (k - 1)*d); a layer called twice overwrites its first call's MACs.
    "torch_count_dilated_kernel_overwrite": ({
        "layer_params": _signature("layer_params") + "\n    return sum(p.numel() for p in layer.parameters())\n",
        "receptive_field": _edit("receptive_field", "field += (kernel - 1) * dilation * jump",
                                 "field += (kernel * dilation - 1) * jump"),
        "count_macs": _edit("count_macs", "macs[name] = macs.get(name, 0) + output.numel() * per_output",
                            "macs[name] = output.numel() * per_output"),
    }, {"test_layer_params", "test_receptive_field", "test_count_macs"}),
    # New: BatchNorm's scale and shift counted even with affine=False; the dilation of a 3-tuple ignored; the
    # MACs of a square kernel assumed.
    "bn_not_affine_no_dilation_square_macs": ({
        "layer_params": _edit("layer_params", "return 2 * layer.num_features if layer.affine else 0",
                              "return 2 * layer.num_features"),
        "receptive_field": _edit("receptive_field", "kernel, stride, dilation = (*layer, 1) if len(layer) == 2 else layer",
                                 "kernel, stride, dilation = layer[0], layer[1], 1"),
        "count_macs": _edit("count_macs", "kh, kw = module.kernel_size", "kh = kw = module.kernel_size[0]"),
    }, {"test_layer_params", "test_receptive_field", "test_count_macs"}),
    # New: the library's receptive field instead of the recurrence; the model run with gradients on.
    "library_field_macs_with_gradients": ({
        "receptive_field": _signature("receptive_field")
        + "\n    from fasttrain.costs import receptive_field as library_field\n    return library_field(layers)\n",
        "count_macs": _edit("count_macs", "        with torch.no_grad():\n            model(x)", "        model(x)"),
    }, {"test_receptive_field", "test_count_macs"}),
    # New: the library's parameter count instead of the formula; MACs per image instead of for the whole batch.
    "library_params_macs_per_image": ({
        "layer_params": _signature("layer_params")
        + "\n    from fasttrain.costs import param_counts\n    return sum(param_counts(layer).values())\n",
        "count_macs": _edit("count_macs", "output.numel() * per_output", "output[0].numel() * per_output"),
    }, {"test_layer_params", "test_count_macs"}),
    # New: the library's layer_costs instead of hooks of one's own.
    "library_layer_costs": ({
        "count_macs": _signature("count_macs") + "\n    from fasttrain.costs import layer_costs\n"
        "    return {r.name: r.macs for r in layer_costs(model, x) if r.macs}\n",
    }, {"test_count_macs"}),
}
TESTS = {"test_layer_params": 3, "test_receptive_field": 3, "test_count_macs": 4}


@pytest.fixture(scope="module")
def scores():
    return grade_variants(SLUG, {name: variant for name, (variant, _) in WRONG.items()}, timeout=60)


def test_solution_gets_full_marks_and_the_blank_copy_zero(scores):
    assert scores["solution"]["total"] == scores["solution"]["max"] == sum(TESTS.values())
    assert all(scores["solution"][t] == p for t, p in TESTS.items()), scores["solution"]
    assert scores["blank"]["total"] == 0, scores["blank"]


@pytest.mark.parametrize("variant", sorted(WRONG))
def test_typical_mistakes_lose_the_points_of_their_tests_and_only_those(scores, variant):
    s = scores[variant]
    caught = WRONG[variant][1]
    assert all(s[t] == 0 for t in caught), f"{variant} should score 0 on {sorted(caught)}: {s}"
    assert all(s[t] == p for t, p in TESTS.items() if t not in caught), f"{variant} lost other points: {s}"


def test_grading_reports_no_tampering_and_no_changed_checksums(scores):
    assert "has changed" not in scores.log and "Tampering" not in scores.log, scores.log[-2000:]


# --- the student's notebook and the smoke run ----------------------------------------------------

def _outputs(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", "") + out.get("evalue", ""))
        data = out.get("data", {})
        parts.append(data.get("text/plain", "") + data.get("text/markdown", ""))
    return "".join(parts)


def test_source_notebook_is_committed_without_outputs():
    nb = nbformat.read(str(ROOT / "solutions" / SLUG / f"{SLUG}.ipynb"), as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_untouched_student_notebook_stops_at_exercise_1_and_claims_no_target(tmp_path):
    import papermill

    out = tmp_path / "student.ipynb"
    with pytest.raises(papermill.PapermillExecutionError) as error:
        papermill.execute_notebook(str(ROOT / "course" / SLUG / f"{SLUG}.ipynb"), str(out), kernel_name="python3",
                                   parameters={"profile": "smoke", "results_dir": str(tmp_path / "results")},
                                   cwd=str(tmp_path), progress_bar=False)
    assert error.value.ename == "NotImplementedError" and "Exercise 1" in error.value.evalue
    nb = nbformat.read(str(out), as_version=4)
    failed = next(c for c in nb.cells if c.cell_type == "code" and any(o.get("output_type") == "error"
                                                                       for o in c.get("outputs", [])))
    assert failed.metadata["nbgrader"]["grade_id"] == "test_layer_params"
    assert "target" not in "".join(_outputs(c) for c in nb.cells if c.cell_type == "code").lower()
    assert not (tmp_path / "results").exists()


def test_smoke_run_reaches_its_targets_and_records_the_ablation():
    _, record = execute_chapter(SLUG)
    assert record["chapter"] == SLUG and record["profile"] == "smoke"
    assert record["passed"] is True, record
    metrics = {m["metric"]: m for m in record["metrics"]}
    assert set(metrics) == {"test_accuracy", "augmentation_gap_cut"} and metrics["test_accuracy"]["passed"]
    ablation = record["extra"]["ablation"]
    assert set(ablation) == {"all ingredients", "no augmentation", "no weight decay", "no label smoothing",
                              "flatten instead of GAP", "no dropout", "no BatchNorm"}
    for name, row in ablation.items():
        assert len(row["runs"]) == record["settings"]["ablation_seeds"]
        assert all(0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["confidence"] <= 1.0 for r in row["runs"]), name
        assert row["summary"]["gap"]["n"] == len(row["runs"])
    assert ablation["flatten instead of GAP"]["params"] > ablation["all ingredients"]["params"]
    assert ablation["no BatchNorm"]["params"] != ablation["all ingredients"]["params"]
    # The main run is the ablation's first training of the whole recipe when their regimes agree.
    first = ablation["all ingredients"]["runs"][0]
    assert first["test_acc"] == pytest.approx(metrics["test_accuracy"]["value"]) or first["lr"] != record["settings"]["max_lr"]


def test_smoke_run_shows_its_table_figure_and_generated_conclusions():
    executed, record = execute_chapter(SLUG)
    nb = nbformat.read(str(executed), as_version=4)
    cells = {c.get("id"): c for c in nb.cells if c.cell_type == "code"}
    table = _outputs(cells["cell-025"])
    assert "| setting | rate | parameters | test accuracy |" in table and "| no BatchNorm |" in table
    assert any("image/png" in o.get("data", {}) for o in cells["cell-025"].outputs), "the ablation drew no figure"
    said = _outputs(cells["conclusions"])
    assert "Label smoothing" in said and "Without BatchNorm" in said
    if record["settings"]["ablation_seeds"] < 2:
        assert "too few to tell from noise" in said
    assert {"gap_all", "gap_no_augmentation", "ablation_seeds"} <= set(record["glue"])
    assert all("remove-input" in cells[i].metadata.get("tags", []) for i in ("regime", "conclusions"))
