"""Mixed precision under a budget (`fddaq.precision`)."""

from dataclasses import replace

import pytest
import torch

from fddaq.config import BudgetConfig, QuantConfig, parse_bit_choices
from fddaq.errors import ConfigError
from fddaq.precision import LayerSize, Point, SizeModel, check_budget, choose, pareto_walk, search, searched_layers
from fddaq.quant.capture import capture
from fddaq.quant.plan import LayerPlan, LayerPlanEntry, resolve_layer_plan, tensor_sites


def images_and_labels(count: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 1, 16, 16, generator=generator), torch.arange(count) % 4


def test_budgets_parse_and_refuse_nonsense():
    assert BudgetConfig(0.2, bit_choices=parse_bit_choices("8,4")).bit_choices == (4, 8)
    assert BudgetConfig(None, 1.0, parse_bit_choices("4, 6,8,4")).bit_choices == (4, 6, 8)
    with pytest.raises(ConfigError):
        parse_bit_choices("4,x")
    for choices in ((), (1, 8), (4, 9)):
        with pytest.raises(ConfigError):
            BudgetConfig(0.2, bit_choices=choices)
    for size, drop in ((None, None), (0.5, 1.0), (None, -1.0), (0.0, None), (None, 101.0)):
        with pytest.raises(ConfigError):
            BudgetConfig(size, drop)
    with pytest.raises(ConfigError):
        BudgetConfig(0.2, holdout=1.0)


def test_impossible_budgets_are_refused_before_any_work(tiny_model):
    """From parameter counts alone: no calibration, no forward (the model is never run)."""
    found = capture(tiny_model, torch.zeros(2, 1, 16, 16))
    with pytest.raises(ConfigError, match=r"below the smallest model .* 4,8 allow: 0\.\d+x"):
        check_budget(tiny_model, found, QuantConfig(8, 8), BudgetConfig(0.01))
    with pytest.raises(ConfigError, match="no layer is left"):
        check_budget(tiny_model, found, QuantConfig(8, 8, layers=("*=8",)), BudgetConfig(0.5))
    check_budget(tiny_model, found, QuantConfig(8, 8), BudgetConfig(0.9))  # a reachable one passes
    with pytest.raises(ConfigError, match="at least 2 images"):  # nothing to hold out
        check_budget(tiny_model, found, QuantConfig(8, 8), BudgetConfig(0.9), torch.tensor([0]))

    def no_forward(*args):
        raise AssertionError("the model ran")

    tiny_model.register_forward_pre_hook(no_forward)
    with pytest.raises(ConfigError, match="below the smallest"):
        search(tiny_model, found, found.outputs[0].name, QuantConfig(8, 8), BudgetConfig(0.01), *images_and_labels())


def test_layers_fixed_by_the_user_are_not_searched(tiny_model):
    found = capture(tiny_model, torch.zeros(2, 1, 16, 16))
    names = [layer.name for layer in found.layers]
    plan = resolve_layer_plan(found, QuantConfig(8, 8, first_last_bits=8, layers=("short=6",)))
    assert searched_layers(plan) == tuple(n for n in names if n not in (names[0], names[-1], "short"))


def test_a_layer_size_counts_what_the_graph_stores():
    conv = LayerSize("conv2d", weights=1000, channels=10, bias=True)
    assert conv.bytes(None) == 4 * 1010
    assert conv.bytes(8, "symmetric") == 1000 + 40 + 80  # INT8, scales, INT32 bias and its scales
    assert conv.bytes(4, "affine") == 500 + 40 + 5 + 80  # packed INT4 and INT4 zero points
    assert LayerSize("linear", 1000, 10, False).bytes(8, "symmetric") == 1000 + 40 + 10  # QGemm's zero point


def walk_fixture():
    """Three layers: `a` big and insensitive, `b` small and sensitive, `c` big and sensitive."""
    sizes = SizeModel({"a": LayerSize("conv2d", 10000, 10, True), "b": LayerSize("conv2d", 100, 10, True),
                       "c": LayerSize("conv2d", 10000, 10, True)}, other_bytes=0.0)
    sensitivity = {"a": {4: 0.02, 8: 0.001}, "b": {4: 0.5, 8: 0.0}, "c": {4: 0.3, 8: 0.0}}
    return sizes, sensitivity


def test_the_walk_gives_nested_plans_from_widest_to_narrowest():
    """`a` goes first (big, insensitive), then `c` (big), then `b` (small, sensitive)."""
    sizes, sensitivity = walk_fixture()
    plan = LayerPlan(tuple(LayerPlanEntry(n, "conv2d", 8, 8, "default bits", "symmetric") for n in "abc"))
    points = pareto_walk(sensitivity, sizes, plan, "auto")
    assert [p.bits for p in points] == [{"a": 8, "b": 8, "c": 8}, {"a": 4, "b": 8, "c": 8},
                                        {"a": 4, "b": 8, "c": 4}, {"a": 4, "b": 4, "c": 4}]
    ratios = [p.ratio for p in points]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] < 1
    # 6-bit weights are stored as INT8: the walk goes from 8 straight to 4, never stopping at 6
    with_six = {name: {**by_bits, 6: by_bits[8]} for name, by_bits in sensitivity.items()}
    assert [p.bits for p in pareto_walk(with_six, sizes, plan, "auto")] == [p.bits for p in points]
    assert [round(p.predicted_kl, 3) for p in points] == [0.001, 0.02, 0.32, 0.82]


def test_choose_bisects_for_the_smallest_plan_within_the_drop():
    points = [Point({"x": i}, ratio=1.0 - 0.1 * i, predicted_kl=float(i)) for i in range(8)]
    calls = []

    def measure(point):  # drop grows with the plan's index: 0, 0.5, 1, ...
        calls.append(point.bits["x"])
        return 0.5 * point.bits["x"], 0.0

    chosen, met, measured = choose(points, measure, None, 1.6)
    assert met and chosen.bits == {"x": 3} and chosen.drop == 1.5
    assert len(calls) <= 5 and [p.bits["x"] for p in measured] == sorted(set(calls))
    chosen, met, _ = choose(points, lambda p: (5.0, 1.0), None, 1.0)  # missed: the closest, the largest plan
    assert not met and chosen.bits == {"x": 0} and chosen.drop == 5.0
    chosen, met, _ = choose(points, measure, 0.55, None)  # size: the largest plan that fits
    assert met and chosen.bits == {"x": 5}


def test_the_search_holds_out_images_of_every_class_with_two_or_of_all_with_one_per_class():
    from fddaq.precision import held_out

    labels = torch.tensor([0] * 8 + [1] * 4 + [2] * 1)
    kept, held = held_out(labels, 0.25, 0)
    assert set(kept.tolist()).isdisjoint(held.tolist()) and len(kept) + len(held) == 13
    assert sorted(labels[held].tolist()) == [0, 0, 1]  # 2 of 8, 1 of 4, none of the single image
    assert set(labels[kept].tolist()) == {0, 1, 2}
    kept, held = held_out(torch.arange(10), 0.25, 0)  # one image per class (partial coverage)
    assert len(held) == 2 and len(kept) == 8 and set(kept.tolist()).isdisjoint(held.tolist())
    with pytest.raises(ConfigError):
        held_out(torch.tensor([3]), 0.25, 0)


def test_search_meets_a_drop_budget_and_its_overrides_reproduce_the_plan(tiny_model):
    found = capture(tiny_model, torch.zeros(2, 1, 16, 16))
    quant = QuantConfig(8, 8, activations="all")
    images, labels = images_and_labels()
    result = search(tiny_model, found, found.outputs[0].name, quant, BudgetConfig(None, 100.0, (2, 8)), images, labels)
    assert result.met and result.held_out == 12 and result.views == 256
    assert result.chosen.bits == dict.fromkeys(result.searched, 2)  # any drop is accepted: the smallest plan
    planned = resolve_layer_plan(found, replace(quant, layers=result.overrides))
    assert {e.name: e.weight_bits for e in planned.quantized} == result.chosen.bits
    sizes = SizeModel.of(tiny_model, found)
    assert sizes.plan_bytes(planned) / sizes.float_bytes() == pytest.approx(result.chosen.ratio)
    # activation bits are kept: every branch reading one tensor still shares its quantizer
    assert tensor_sites(found, planned) == tensor_sites(found, resolve_layer_plan(found, quant))
    assert set(result.uniform) == {"W2A8", "W8A8", "W2A2"}
    assert result.uniform["W8A8"].drop <= result.uniform["W2A8"].drop <= result.uniform["W2A2"].drop
    assert result.uniform["W2A2"].ratio > result.uniform["W2A8"].ratio  # the clamps of inputs below 8 bits
    assert result.to_json()["sensitivity"]


def test_search_reports_the_closest_plan_when_the_drop_budget_is_missed():
    """A linear classifier whose 2-bit weights move some images' classes: with 2 bits the only
    choice, no plan keeps every held-out image, and the closest plan is returned."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 10)).eval()
    found = capture(model, torch.zeros(2, 1, 16, 16))
    images, labels = images_and_labels(96)
    result = search(model, found, found.outputs[0].name, QuantConfig(2, 8), BudgetConfig(None, 0.0, (2,)), images, labels)
    assert not result.met and result.chosen.drop > 0
    assert result.chosen.bits == {"1": 2} and result.points == (result.chosen,)


def test_a_plan_is_measured_as_the_widest_model_with_narrower_weights_swapped_in(tiny_model):
    """`Widths` calibrates once: a plan's outputs are those of the model prepared with the plan's
    bits, its weights at their MSE grids (narrower ones with their rounding's bias shift) and
    its activation ranges those of the widest plan."""
    from fddaq.config import CalibrationConfig
    from fddaq.precision import Widths, with_bits
    from fddaq.quant.bias import zero_shifts
    from fddaq.quant.modules import Selected
    from fddaq.quant.prepare import prepare
    from fddaq.sensitivity import Measure

    found = capture(tiny_model, torch.zeros(2, 1, 16, 16))
    output = found.outputs[0].name
    plan = resolve_layer_plan(found, QuantConfig(8, 8, activations="all"))
    searched = searched_layers(plan)
    images, _ = images_and_labels()
    widths = Widths(tiny_model, found, output, plan, "auto", (2, 4, 8), searched, images, CalibrationConfig())
    bits = {name: (2, 4, 8)[i % 3] for i, name in enumerate(searched)}
    assert sorted(set(bits.values())) == [2, 4, 8]
    student = prepare(tiny_model, found, with_bits(plan, bits, "auto"), output)
    zero_shifts(student)  # calibration without bias correction
    student.load_state_dict(widths.base.state_dict())
    weights = student.layer_weights()
    for layer in student.layers:
        if layer.name in bits:
            layer.weight_quant.set_mse(weights[layer.name])
            if bits[layer.name] < 8:  # with its rounding's bias shift
                layer.bias_shift = widths.widths[layer.name][bits[layer.name]][1]
    measure = Measure(Selected(tiny_model, output), images, None)
    before = measure(widths.base)
    assert widths.measure(measure, bits) == measure(student.eval()) != before
    assert measure(widths.base) == before  # swapped back

    def failing(model):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        widths.measure(failing, {searched[0]: 2}, alone=True)
    assert measure(widths.base) == before  # swapped back and every quantizer on again, after an error too


def test_a_layers_sensitivity_has_every_other_value_float(tiny_model):
    """Measured with the other layers and every activation quantizer off, it equals the model
    with only that layer's weights (and its bias shift) quantized (`sensitivity.only`)."""
    from fddaq.config import CalibrationConfig
    from fddaq.precision import Widths
    from fddaq.quant.modules import Selected
    from fddaq.sensitivity import Measure, only

    found = capture(tiny_model, torch.zeros(2, 1, 16, 16))
    output = found.outputs[0].name
    plan = resolve_layer_plan(found, QuantConfig(8, 8, activations="all"))
    searched = searched_layers(plan)
    images, _ = images_and_labels()
    widths = Widths(tiny_model, found, output, plan, "auto", (2, 8), searched, images, CalibrationConfig())
    measure = Measure(Selected(tiny_model, output), images, None)
    for name in searched:
        alone = widths.measure(measure, {name: 2}, alone=True)
        layer = widths.base.quant_layer(name)
        layer.weight_quant, layer.bias_shift = widths.widths[name][2]
        for other in widths.base.layers:  # float: without their own rounding's shifts either
            if other is not layer:
                other.bias_shift = torch.zeros_like(other.bias_shift)
        widths.base.tap = only(layer, "w")
        expected = measure(widths.base)
        widths.base.tap = None
        widths._restore()
        assert alone == expected and alone.kl > 0
    assert all(q.enabled for q in widths.base.activation_quantizers().values())
    assert all(layer.enabled for layer in widths.base.layers)


def test_sensitivities_average_real_and_synthetic_images(tiny_model):
    from fddaq.config import CalibrationConfig
    from fddaq.precision import Widths, weight_sensitivity
    from fddaq.quant.modules import Selected
    from fddaq.sensitivity import Measure

    found = capture(tiny_model, torch.zeros(2, 1, 16, 16))
    output = found.outputs[0].name
    plan = resolve_layer_plan(found, QuantConfig(8, 8))
    searched = searched_layers(plan)
    real, _ = images_and_labels(16)
    synthetic, _ = images_and_labels(16, seed=1)
    synthetic = synthetic * 3  # other images, other statistics
    widths = Widths(tiny_model, found, output, plan, "auto", (2, 8), searched, real, CalibrationConfig())
    teacher = Selected(tiny_model, output)
    both = weight_sensitivity(widths, Measure(teacher, real, synthetic))
    alone = [weight_sensitivity(widths, Measure(teacher, x, None)) for x in (real, synthetic)]
    for name in searched:
        assert both[name][2] == pytest.approx((alone[0][name][2] + alone[1][name][2]) / 2)
        assert alone[0][name][2] != pytest.approx(alone[1][name][2])
