import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fddaq import reconstruct as reconstruct_module
from fddaq.config import CalibrationConfig, ReconstructConfig
from fddaq.quant.calibrate import calibrate
from fddaq.quant.units import Unit, find_units
from fddaq.reconstruct import _beta, _chained, _MaskBank, _Rounding, reconstruct, view_pool
from fddaq.zoo.mobilenet import fashion_mobilenet
from tests.conftest import fake_quant_model
from tests.models import randomize_bn


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(channels, channels, 3, padding=1)
        self.b = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


class Net(nn.Module):
    """A stem, two residual blocks in a Sequential, a head called with a functional step before
    it, a module used twice (cannot be replayed alone) and a layer called by the root's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.blocks = nn.Sequential(Block(4), Block(4))
        self.twice = nn.Conv2d(4, 4, 1)
        self.weight = nn.Parameter(torch.randn(4, 4, 1, 1) * 0.3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.blocks(torch.relu(self.stem(x)))
        x = self.twice(self.twice(x))
        x = F.conv2d(x, self.weight)
        return self.fc(x.mean((2, 3)))


def test_units_follow_the_structure_not_the_names():
    units = find_units(fake_quant_model(Net().eval(), (1, 8, 8)))
    assert units == [
        Unit("stem", ("stem",)),
        Unit("blocks.0", ("blocks.0.a", "blocks.0.b")),
        Unit("blocks.1", ("blocks.1.a", "blocks.1.b")),
        Unit("fc", ("fc",)),
    ]  # `twice` runs twice and `weight` is called by the root: they stay outside


def test_inverted_residuals_are_units():
    units = find_units(fake_quant_model(fashion_mobilenet().eval(), (1, 28, 28)))
    assert [u.module for u in units] == ["stem", *(f"blocks.{i}" for i in range(8)), "head", "fc"]
    assert [len(u.layers) for u in units][1:4] == [2, 3, 3]


def test_rounding_starts_at_the_float_weight_and_ends_on_the_grid():
    torch.manual_seed(0)
    weight, scale = torch.randn(3, 5), torch.tensor([[0.3], [0.2], [0.5]])
    zero_point = torch.tensor([[0.0], [2.0], [-1.0]])  # the affine 4-bit grid: -8..7 around each zero point
    low, high = -8 - zero_point, 7 - zero_point
    rounding = _Rounding(weight, scale, zero_point, -8, 7)
    assert torch.allclose(rounding(scale), torch.maximum(torch.minimum(weight, high * scale), low * scale), atol=1e-5)
    nearest = torch.maximum(torch.minimum(torch.round(weight / scale), high), low) * scale
    assert ((rounding.hard(scale) - nearest).abs() <= scale + 1e-6).all()  # one step at most: up or down
    assert rounding.regulariser(2.0) > 0
    with torch.no_grad():
        rounding.v.copy_(torch.where(rounding.v >= 0, 10.0, -10.0))
    assert rounding.regulariser(2.0) == 0 and torch.allclose(rounding(scale), rounding.hard(scale))
    assert torch.allclose(rounding.hard(2 * scale), 2 * rounding.hard(scale))  # the integers stay when the step learns


def test_beta_is_off_while_warming_up_then_falls_from_20_to_2():
    assert _beta(0.1, 0.2) is None
    assert _beta(0.2, 0.2) == 20.0 and _beta(1.0, 0.2) == pytest.approx(2.0) and 2 < _beta(0.6, 0.2) < 20


def test_view_pool_keeps_each_real_image_once_then_augments_and_adds_synthetic_images():
    real, synthetic = torch.randn(5, 1, 8, 8), torch.randn(30, 1, 8, 8)
    pool = view_pool(real, synthetic, ReconstructConfig(views=12))
    assert pool.shape == (24, 1, 8, 8) and torch.equal(pool[:5], real)
    assert torch.equal(view_pool(real, synthetic, ReconstructConfig(views=12)), pool)  # seeded


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().eval()


def _setup(model):
    student = fake_quant_model(model, (1, 8, 8), weight_bits=3, act_bits=3)
    images = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    calibrate(student, images, CalibrationConfig(bias_images=0))  # reconstruction alone (see test_bias)
    return student, images


def _output_error(student, model, images):
    with torch.no_grad():
        return (student(images) - model(images)).square().mean().item()


def test_reconstruction_moves_outputs_towards_float_and_leaves_weights_on_their_grid(net):
    student, images = _setup(net)
    before = _output_error(student, net, images)
    result = reconstruct(student, net, images, ReconstructConfig(iterations=200, batch_size=16, views=48))
    assert result.units == 4 and result.rounded_layers == result.layers == 6 and result.pool == 48
    assert result.loss_after < result.loss_before
    assert all(after < 1.01 * before for before, after in result.unit_losses.values()), result.unit_losses
    assert _output_error(student, net, images) < before
    weights = student.layer_weights()
    # a unit whose error fell holds its learned roundings (one that did not keeps its old state)
    improved = {unit.module for unit in find_units(student) if result.unit_losses[unit.module][1] < result.unit_losses[unit.module][0]}
    assert len(improved) >= 3
    inside = {name for unit in find_units(student) if unit.module in improved for name in unit.layers}
    for layer in (layer for layer in student.layers if layer.name in inside):
        scaled = weights[layer.name] / layer.weight_quant.scale().reshape(layer.weight_quant.channel_shape(weights[layer.name]))
        assert torch.allclose(scaled, scaled.round(), atol=1e-4), layer.name  # round-to-nearest gives the learned integers
    assert all(p.requires_grad for p in student.parameters()) and student.tap is None


def test_a_small_net_without_blocks_is_one_unit(tiny_model):
    assert find_units(fake_quant_model(tiny_model)) == [Unit("", ("conv1", "conv2", "short", "fc"))]


def test_reconstruction_resumes_after_a_unit_to_the_same_result(net):
    config = ReconstructConfig(iterations=8, batch_size=8, views=48)
    reference, images = _setup(net)
    reconstruct(reference, net, images, config)
    states = []
    interrupted, _ = _setup(net)

    class Stop(Exception):
        pass

    def on_event(event):
        if event.step == 2 * config.iterations + 3:
            raise Stop

    with pytest.raises(Stop):
        reconstruct(interrupted, net, images, config, on_event, states.append)
    assert [s["units"] for s in states] == [1, 2]
    resumed, _ = _setup(net)
    result = reconstruct(resumed, net, images, config, resume=states[-1])
    assert set(result.unit_losses) == {u.module for u in find_units(resumed)}
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_mobilenet_reconstruction_runs_every_unit():
    model = randomize_bn(fashion_mobilenet())
    student = fake_quant_model(model, (1, 28, 28), weight_bits=4, act_bits=4)
    images = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    calibrate(student, images)
    result = reconstruct(student, model, images, ReconstructConfig(iterations=2, batch_size=4, views=16))
    assert result.units == 11 and result.layers == 26 and len(result.unit_losses) == 11


def test_units_the_model_chains_are_found_from_the_tensors_they_pass(net):
    student = fake_quant_model(net, (1, 8, 8))
    modules = [student.model.get_submodule(unit.module) for unit in find_units(student)]
    # stem -> relu -> blocks.0 -> blocks.1 -> (twice, conv, mean) -> fc: only blocks.1 takes what the unit before returned
    assert _chained(student, student.forward_all, modules, torch.zeros(1, 1, 8, 8)) == [False, False, True, False]


def test_a_tensor_changed_in_place_between_two_units_does_not_chain_them():
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = (nn.Conv2d(2, 2, 1) for _ in range(3))

        def forward(self, x):
            x = self.b(self.a(x))
            x.relu_()  # same tensor, other values: c's input is not b's output
            return self.c(x)

    model = InPlace().eval()
    assert _chained(model, model, [model.a, model.b, model.c], torch.randn(1, 2, 4, 4)) == [False, True, False]


def test_chained_units_get_the_same_inputs_as_running_the_model_up_to_them(net, monkeypatch):
    config = ReconstructConfig(iterations=6, batch_size=8, views=48)
    chained, images = _setup(net)
    reference = reconstruct(chained, net, images, config)
    prefix, _ = _setup(net)
    monkeypatch.setattr(reconstruct_module, "_chained", lambda model, run, modules, example: [False] * len(modules))
    result = reconstruct(prefix, net, images, config)
    for unit, losses in reference.unit_losses.items():
        assert result.unit_losses[unit] == pytest.approx(losses), unit
    for key, value in chained.state_dict().items():
        assert torch.allclose(prefix.state_dict()[key], value, atol=1e-6), key


def test_units_at_a_high_resolution_train_on_fewer_images_per_batch(net):
    student, images = _setup(net)
    # per image the stem quantizes 64 input elements, each block 2 x 4 x 8 x 8 = 512, fc 4
    result = reconstruct(student, net, images, ReconstructConfig(iterations=2, batch_size=16, batch_elements=1024, views=48))
    assert result.unit_batches == {"stem": 16, "blocks.0": 2, "blocks.1": 2, "fc": 16}


def test_qdrop_masks_skip_the_quantizer_at_the_asked_rate_and_change_every_draw():
    masks = _MaskBank(0.3, torch.Generator().manual_seed(0))
    like = torch.zeros(4, 8, 16, 16)
    first, second = masks.draw(like), masks.draw(like)
    assert first.shape == like.shape and set(first.unique().tolist()) == {0.0, 1.0}
    assert abs(first.mean().item() - 0.3) < 0.03 and not torch.equal(first, second)
    assert masks.draw(torch.zeros(3, 5)).shape == (3, 5)


def test_a_unit_that_changes_its_input_in_place_leaves_the_cached_inputs_alone():
    from fddaq.reconstruct import _apply

    inputs = torch.randn(70, 3)
    before = inputs.clone()
    out = _apply(lambda x: x.relu_(), inputs, torch.device("cpu"))
    assert torch.equal(inputs, before) and torch.equal(out, before.relu())
