from dataclasses import replace

import pytest
import torch

from fddaq.config import FinetuneConfig, QuantConfig
from fddaq.errors import ConfigError
from fddaq.finetune import _Batches, finetune, split_holdout, student_loss
from fddaq.quant.calibrate import calibrate
from fddaq.quant.modules import quant_layers
from fddaq.recipes import DEFAULT_RECIPE, recipe_config
from tests.conftest import fake_quant_model


def test_student_loss_weights_kd_and_cross_entropy():
    teacher = torch.tensor([[2.0, 0.0, 0.0]])
    labels = torch.tensor([1])
    kd_only = student_loss(teacher, teacher, labels, FinetuneConfig(kd_weight=1.0, ce_weight=0.0))
    assert kd_only.abs().item() < 1e-6
    ce = torch.nn.functional.cross_entropy(teacher, labels).item()
    both = student_loss(teacher, teacher, labels, FinetuneConfig(kd_weight=20.0, ce_weight=1.0, temperature=20.0))
    assert both.item() == pytest.approx(ce, rel=1e-5)


def test_holdout_is_stratified_seeded_and_spares_small_classes():
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 1)
    train, holdout = split_holdout(labels, 0.1, seed=3)
    assert labels[holdout].tolist() == [0, 1, 1]
    assert sorted(torch.cat([train, holdout]).tolist()) == list(range(31))
    again = split_holdout(labels, 0.1, seed=3)
    assert torch.equal(again[1], holdout)
    assert len(split_holdout(labels, 0.0, 0)[1]) == 0


def test_batches_mix_real_and_synthetic_by_fraction():
    real = (torch.zeros(10, 1, 8, 8), torch.zeros(10, dtype=torch.long))
    synthetic = (torch.ones(10, 1, 8, 8), torch.ones(10, dtype=torch.long))
    images, labels = _Batches(FinetuneConfig(batch_size=32, synthetic_fraction=0.5), real, synthetic).next()
    assert labels.tolist() == [0] * 16 + [1] * 16
    assert images[:16].max() == 0 and images[16:].min() == 1  # augmentation keeps each source's pixels
    _, labels = _Batches(FinetuneConfig(batch_size=8), real, None).next()
    assert labels.tolist() == [0] * 8


def test_recipes():
    quant = QuantConfig(4, 4)
    ptq = recipe_config("ptq", quant)
    assert ptq.finetune.steps == 0 and ptq.synth.num_images == 0 and ptq.recipe == "ptq"
    paper = recipe_config("fdda-paper", quant, seed=2, steps=10)
    f = paper.finetune
    assert (f.optimizer, f.temperature, f.kd_weight, f.ce_weight, f.learn_scales) == ("sgd", 20.0, 20.0, 1.0, False)
    assert f.steps == 10 and f.seed == 2 and paper.synth.seed == 2
    assert recipe_config("fddaq", quant, synthetic=0).synth.num_images == 0
    blocks = recipe_config("reconstruct", quant, seed=3)
    assert blocks.reconstruct.iterations > 0 and blocks.reconstruct.seed == 3 and blocks.finetune.steps == 0
    assert blocks.synth.num_images == 0  # synthetic images only when asked for
    assert recipe_config("reconstruct", quant, synthetic=64).synth.num_images == 64
    short = recipe_config("reconstruct", quant, steps=7)  # its steps are iterations per unit
    assert short.reconstruct.iterations == 7 and short.finetune.steps == 0
    assert ptq.reconstruct.iterations == 0 and paper.reconstruct.iterations == 0
    assert DEFAULT_RECIPE == "reconstruct"
    with pytest.raises(ConfigError, match="unknown recipe 'best'.*reconstruct, fddaq, fdda-paper, ptq, data-free"):
        recipe_config("best", quant)


class Stop(Exception):
    pass


def run(tiny_model, config, stop_at=None, resume=None, states=None):
    student = fake_quant_model(tiny_model, weight_bits=4, act_bits=4)
    images = torch.randn(40, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(40) % 4
    calibrate(student, images)
    synthetic = (torch.randn(20, 1, 16, 16, generator=torch.Generator().manual_seed(1)), torch.arange(20) % 4)

    def on_event(event):
        if stop_at is not None and event.stage == "finetune" and event.step == stop_at:
            raise Stop

    try:
        result = finetune(student, tiny_model, (images, labels), config, synthetic, on_event,
                          None if states is None else states.append, resume)
    except Stop:
        return None, None
    return student, result


@pytest.mark.parametrize("recipe", ["fddaq", "fdda-paper"])
def test_resume_reaches_the_uninterrupted_result(tiny_model, recipe):
    config = recipe_config(recipe, QuantConfig(4, 4), seed=1, steps=12).finetune
    config = type(config)(**{**config.__dict__, "batch_size": 8, "checkpoint_every": 5, "observe_fraction": 0.5})
    reference, result = run(tiny_model, config)
    states = []
    assert run(tiny_model, config, stop_at=8, states=states) == (None, None)
    assert [s["step"] for s in states] == [0, 5]
    resumed, resumed_result = run(tiny_model, config, resume=states[-1])
    assert resumed_result.resumed_from == 5 and resumed_result.last_loss == result.last_loss
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_paper_mode_uses_min_max_weights_and_frozen_ema_ranges(tiny_model):
    config = recipe_config("fdda-paper", QuantConfig(4, 4), steps=6).finetune
    config = type(config)(**{**config.__dict__, "batch_size": 8, "observe_fraction": 0.5})
    student, _ = run(tiny_model, config)
    weights = student.layer_weights()
    for layer in quant_layers(student):
        scale, zero_point = layer.weight_quant.scale().clone(), layer.weight_quant.zero_point.clone()
        layer.weight_quant.set_min_max(weights[layer.name])
        assert torch.allclose(layer.weight_quant.scale(), scale) and torch.equal(layer.weight_quant.zero_point, zero_point)
        assert layer.input_quant.ema_momentum is None and layer.input_quant.observed_range() is not None


def test_a_state_from_other_options_is_not_resumed():
    from pathlib import Path

    from fddaq.config import RunConfig
    from fddaq.errors import ConfigError
    from fddaq.pipeline import ResumeState, Source, load_inputs, quantize_inputs

    example = Path(__file__).resolve().parents[2] / "examples" / "fashion_mnist"
    inputs = load_inputs(Source(example / "model.pth", "fddaq:fashion_resnet", example / "calib"))
    with pytest.raises(ConfigError, match="made with other options"):
        quantize_inputs(inputs, RunConfig(), resume=ResumeState("{}", None, finetune={}))


def test_a_resume_state_reads_back_and_one_of_another_format_is_refused():
    from fddaq.pipeline import RESUME_FORMAT, ResumeState

    state = ResumeState("{}", "fingerprint", finetune={"step": 3, "losses": torch.arange(3.0)}, plan=("conv=4/8",))
    written = state.to_dict()
    assert written["format"] == RESUME_FORMAT and written["plan"] == ["conv=4/8"]  # what weights_only loads
    read = ResumeState.from_dict(written)
    assert read.plan == state.plan and read.finetune["step"] == 3 and read.config == "{}"
    for other in ({**written, "format": RESUME_FORMAT + 1}, {k: v for k, v in written.items() if k != "format"}, [1]):
        with pytest.raises(ConfigError, match="written by another version of fddaq"):
            ResumeState.from_dict(other)


def test_data_free_recipe_trains_on_synthetic_images_only():
    """Whatever the calibration images hold, a data-free run gives the same model: they may
    only measure it. The real-image recipe, given the same swap, does change."""
    from dataclasses import replace
    from pathlib import Path

    from fddaq.pipeline import Source, load_inputs, quantize_inputs

    example = Path(__file__).resolve().parents[2] / "examples" / "fashion_mnist"
    inputs = load_inputs(Source(example / "model.pth", "fddaq:fashion_resnet", example / "calib"))
    noise = replace(inputs, calib=replace(inputs.calib, images=torch.randn_like(inputs.calib.images)))

    def weights(recipe, inputs):
        config = recipe_config(recipe, QuantConfig(4, 4), steps=3, synthetic=32, synth_steps=3)
        result = quantize_inputs(inputs, replace(config, finetune=replace(config.finetune, batch_size=8)))
        return result, result.model.state_dict()

    free, free_weights = weights("data-free", inputs)
    assert not free.inputs.calib.images.equal(noise.calib.images)
    assert free.synthesis.report.classes_with_center == 0 and free.finetune.holdout_images == 0
    _, free_noise_weights = weights("data-free", noise)
    for key, value in free_weights.items():
        assert torch.equal(free_noise_weights[key], value), key
    _, real_weights = weights("fddaq", inputs)
    _, real_noise_weights = weights("fddaq", noise)
    assert any(not torch.equal(real_noise_weights[k], v) for k, v in real_weights.items())


def test_data_free_needs_synthetic_images():
    with pytest.raises(ConfigError, match="data-free.*num_images"):
        recipe_config("data-free", QuantConfig(4, 4), synthetic=0)


def test_reconstruction_runs_before_fine_tuning_and_resumes_from_a_unit():
    from dataclasses import replace
    from pathlib import Path

    from fddaq.config import ReconstructConfig
    from fddaq.pipeline import Source, load_inputs, quantize_inputs

    example = Path(__file__).resolve().parents[2] / "examples" / "fashion_mnist"
    inputs = load_inputs(Source(example / "mobilenet.pth", "fddaq:fashion_mobilenet", example / "calib"))
    config = recipe_config("reconstruct", QuantConfig(4, 4), synthetic=0)
    config = replace(config, reconstruct=ReconstructConfig(iterations=2, batch_size=4, views=16),
                     finetune=replace(config.finetune, steps=2, batch_size=4))
    states = []
    reference = quantize_inputs(inputs, config, on_checkpoint=states.append)
    assert reference.reconstruct.units == 11
    assert reference.reconstruct.pool == 90  # every training image once (views < images); the 10 held out stay out
    assert "reconstruct" in reference.timings and reference.finetune.steps == 2
    unit_states = [s for s in states if s.finetune is None]
    assert [s.reconstruct["units"] for s in unit_states] == list(range(1, 11))
    resumed = quantize_inputs(inputs, config, resume=unit_states[4])
    assert set(resumed.reconstruct.unit_losses) == set(reference.reconstruct.unit_losses)
    for key, value in reference.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def test_the_run_chooses_synthesis_from_its_images_unless_told(monkeypatch):
    from fddaq import recipes
    from fddaq.recipes import synthesis_choice

    quant = QuantConfig()
    config, why = synthesis_choice(recipe_config("reconstruct", quant), 1, 10, 10)
    assert config.synth.num_images == 0 and why.startswith("no FDDA images: 1 calibration image per class;")
    assert "block reconstruction" in why
    config, why = synthesis_choice(recipe_config("fddaq", quant), 10, 10, 10)  # measured to pay
    assert config.synth.num_images == 1024 and why.startswith("FDDA images: 10 calibration images per class;")
    assert "end-to-end" in why
    config, why = synthesis_choice(recipe_config("fddaq", quant), 1, 10, 10)  # measured to pay with one image too
    assert config.synth.num_images == 1024 and "+0.34 points" in why
    config, why = synthesis_choice(recipe_config("fddaq", quant), 10, 3, 10)
    assert config.synth.num_images == 0 and why.startswith("no FDDA images: 3 of 10 classes")
    # the measured table decides: where it says synthesis pays, the recipe's images are made
    monkeypatch.setitem(recipes.PAYS, (True, "few"), (True, "measured to pay"))
    config, why = synthesis_choice(recipe_config("reconstruct", quant), 20, 19, 1000)
    assert config.synth.num_images == 1024 and why == "FDDA images: 19 of 1000 classes have calibration images; measured to pay"
    assert not config.auto_synthesis
    for told in (recipe_config("reconstruct", quant, synthetic=64), recipe_config("fddaq", quant, synthetic=0),
                 recipe_config("fdda-paper", quant), recipe_config("data-free", quant)):
        config, why = synthesis_choice(told, 1, 3, 10)
        assert config == replace(told, auto_synthesis=False) and why.endswith("set by the recipe and the options")
    assert recipe_config("fddaq", quant).auto_synthesis
    config, why = synthesis_choice(recipe_config("fddaq", quant, steps=0), 10, 10, 10)  # nothing trains
    assert config.synth.num_images == 0 and why == "no synthetic images, set by the recipe and the options"


def test_a_budget_run_searches_after_its_synthesis_and_measures_on_its_images(monkeypatch):
    from dataclasses import replace
    from pathlib import Path

    from fddaq import pipeline
    from fddaq.config import BudgetConfig
    from fddaq.pipeline import Source, load_inputs, quantize_inputs

    example = Path(__file__).resolve().parents[2] / "examples" / "fashion_mnist"
    inputs = load_inputs(Source(example / "model.pth", "fddaq:fashion_resnet", example / "calib"))
    seen = {}

    def spy(*args, **kwargs):
        seen["synthetic"] = args[8]  # search(model, capture, output, quant, budget, images, labels, seed, synthetic, ...)
        return search(*args, **kwargs)

    search = pipeline.search
    monkeypatch.setattr(pipeline, "search", spy)
    config = recipe_config("fddaq", QuantConfig(8, 8), steps=2, synthetic=16, synth_steps=2)
    config = replace(config, budget=BudgetConfig(None, 100.0), finetune=replace(config.finetune, batch_size=8))
    result = quantize_inputs(inputs, config)
    assert seen["synthetic"] is not None and torch.equal(seen["synthetic"], result.synthesis.images)
    assert list(result.timings).index("synthesize") < list(result.timings).index("bit search")
    assert result.precision.met and set(result.config.quant.layers) >= set(result.precision.overrides)


def test_a_state_saved_for_another_searched_plan_is_not_resumed():
    """A budget run's states record the plan searched; a resumed run searches again and refuses
    a state saved for another plan (whose quantizers would load silently into this one)."""
    from dataclasses import replace
    from pathlib import Path

    from fddaq.config import BudgetConfig, ReconstructConfig
    from fddaq.errors import ConfigError
    from fddaq.pipeline import Source, load_inputs, quantize_inputs

    example = Path(__file__).resolve().parents[2] / "examples" / "fashion_mnist"
    inputs = load_inputs(Source(example / "mobilenet.pth", "fddaq:fashion_mobilenet", example / "calib"))
    config = recipe_config("reconstruct", QuantConfig(8, 8), synthetic=0)
    config = replace(config, reconstruct=ReconstructConfig(iterations=1, batch_size=4, views=8),
                     finetune=replace(config.finetune, steps=0), budget=BudgetConfig(0.3))
    states = []
    result = quantize_inputs(inputs, config, on_checkpoint=states.append)
    assert states and all(state.plan == result.precision.overrides for state in states)
    other = replace(states[0], plan=tuple(entry.replace("=4/", "=8/") for entry in states[0].plan))
    assert other.plan != states[0].plan
    with pytest.raises(ConfigError, match="another plan"):
        quantize_inputs(inputs, config, resume=other)
