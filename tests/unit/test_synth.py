from dataclasses import replace

import pytest
import torch

from fddaq.config import SynthConfig
from fddaq.errors import ConfigError
from fddaq.stats import batchnorm_layers, class_statistics
from fddaq.synth.generator import Generator
from fddaq.synth.losses import bns_loss, centralized_bns_loss, class_loss, distorted_bns_loss, global_bns_loss
from fddaq.synth.pool import RowAdam, initial_pool, optimize_pool
from fddaq.synth.quality import QualityProbe, feature_scale
from fddaq.synth.train import generate, train_generator
from tests.models import TinyResNet, randomize_bn

M = [torch.tensor([1.0, 2.0])]
V = [torch.tensor([3.0, 5.0])]


def test_bns_loss_is_mse_of_mean_plus_mse_of_variance():
    assert bns_loss(M[0], V[0], torch.tensor([0.0, 0.0]), torch.tensor([3.0, 1.0])).item() == pytest.approx(2.5 + 8.0)


def test_global_loss_averages_layers_against_running_statistics():
    stats = [(M[0], V[0]), (torch.zeros(1), torch.ones(1))]
    running = [(M[0], V[0]), (torch.ones(1), torch.ones(1))]
    assert global_bns_loss(stats, running).item() == pytest.approx((0.0 + 1.0) / 2)


def test_centralized_loss_is_zero_at_the_center():
    stats = [(M[0], V[0])]
    assert centralized_bns_loss(stats, [(M[0], V[0])]).item() == 0.0
    assert centralized_bns_loss(stats, [(M[0] + 1, V[0])]).item() == pytest.approx(1.0)


def test_distorted_loss_draws_fresh_seeded_noise_of_the_given_std():
    stats, centers = [(M[0], V[0])], [(M[0], V[0])]
    g = lambda: torch.Generator().manual_seed(0)
    a = distorted_bns_loss(stats, centers, 0.5, 1.0, g())
    assert a.item() == distorted_bns_loss(stats, centers, 0.5, 1.0, g()).item()
    assert distorted_bns_loss(stats, centers, 0.0, 0.0, g()).item() == 0.0
    # expectation: noise variance on means + on variances
    big = [(torch.zeros(20000), torch.zeros(20000))]
    assert distorted_bns_loss(big, big, 0.5, 1.0, g()).item() == pytest.approx(0.25 + 1.0, rel=0.05)


def test_standardised_bns_measures_errors_in_units_of_each_channels_spread():
    scale = torch.tensor([4.0, 100.0])
    # mean errors 2 and 10 are one standard deviation each; variance errors 4 and 100 are one variance each
    loss = bns_loss(torch.tensor([2.0, 10.0]), torch.tensor([8.0, 200.0]), torch.zeros(2), torch.tensor([4.0, 100.0]), scale)
    assert loss.item() == pytest.approx(1.0 + 1.0)
    # a channel that never varies is measured against a tenth of the median spread, not 0
    dead = bns_loss(torch.tensor([1.0, 0.0, 0.0]), torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.tensor([0.0, 1.0, 1.0]))
    assert dead.item() == pytest.approx((1.0 / 0.1) / 3)
    assert global_bns_loss(S := [(torch.tensor([2.0, 10.0]), torch.tensor([4.0, 100.0]))], [(torch.zeros(2), scale)], True).item() == \
        pytest.approx(1.0)
    assert centralized_bns_loss(S, [(torch.zeros(2), scale)], True).item() == pytest.approx(1.0)
    assert distorted_bns_loss(S, [(torch.zeros(2), scale)], 0.0, 0.0, None, True).item() == pytest.approx(1.0)


def test_class_loss_is_cross_entropy():
    logits = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    assert class_loss(logits, torch.tensor([0, 1])).item() < 1e-3


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 30), (3, 64), (3, 260)])
def test_generator_shapes_for_grey_rgb_and_odd_sizes(channels, size):
    gen = Generator(num_classes=7, channels=channels, image_size=size, width=16)
    x = gen.sample(torch.arange(6) % 7)
    assert x.shape == (6, channels, size, size)
    assert abs(x.mean().item()) < 0.2  # standardised output


def test_a_generator_with_bounds_draws_within_the_input_range_and_can_drop_the_label_embedding():
    low, high = torch.tensor([-0.5, 0.0, -2.0]).view(3, 1, 1), torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1)
    gen = Generator(num_classes=5, channels=3, image_size=12, width=8, bounds=(low, high), label_embedding=False)
    assert gen.embed is None and gen.standardise is None
    x = gen.sample(torch.arange(16) % 5)
    assert x.shape == (16, 3, 12, 12) and (x >= low).all() and (x <= high).all()
    assert x[:, 2].max() > 0.5  # the range is used, not squeezed into [-1, 1]
    # a single-class batch is not standardised like a mixed one: its own mean survives
    assert abs(gen.sample(torch.zeros(16, dtype=torch.long))[:, 2].mean().item()) > 1e-3


def setup(channels=1):
    torch.manual_seed(0)
    model = randomize_bn(TinyResNet(in_channels=channels, num_classes=4))
    layers = batchnorm_layers(model, torch.zeros(1, channels, 16, 16))
    images = torch.randn(8, channels, 16, 16)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])  # class 3 has no calibration image
    return model, layers, class_statistics(model, layers, images, labels, 4)


SMALL = dict(batch_size=8, width=16, latent_dim=8)


@pytest.mark.parametrize("channels", [1, 3])
def test_training_is_seeded_and_covers_partial_classes(channels):
    model, layers, stats = setup(channels)
    config = SynthConfig(steps=3, **SMALL)
    before = torch.get_rng_state()
    a = train_generator(model, layers, stats, (channels, 16, 16), config)
    assert torch.equal(torch.get_rng_state(), before)  # seeded by its own generators: the caller's state is untouched
    torch.manual_seed(123)  # and a global state set elsewhere changes nothing
    b = train_generator(model, layers, stats, (channels, 16, 16), config)
    assert a.curves == b.curves and len(a.curves["total"]) == 3
    assert all(len(a.curves[k]) == 3 for k in ("ce", "bns", "cbns", "dbns", "ce_single"))
    x1, y1 = generate(a.generator, 10, seed=1)
    x2, y2 = generate(b.generator, 10, seed=1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert sorted(y1.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]  # every class, even without center
    assert all(p.requires_grad for p in model.parameters())  # teacher restored


def test_only_classes_with_a_center_get_center_losses():
    model, layers, stats = setup()
    # labels 0 0 1 1 2 2 0 1: every image of class 1 misclassified, class 3 without any image
    stats = type(stats)(stats.means, stats.variances, stats.labels,
                        torch.tensor([True, False, False, False, True, True, False, False]), 4)
    result = train_generator(model, layers, stats, (1, 16, 16), SynthConfig(steps=1, **SMALL))
    assert result.classes_with_center == 2  # classes 0 and 2
    empty = class_statistics(model, layers, torch.randn(2, 1, 16, 16), torch.tensor([0, 1]), 4)
    empty = type(empty)(empty.means, empty.variances, empty.labels, torch.tensor([False, False]), 4)
    result = train_generator(model, layers, empty, (1, 16, 16), SynthConfig(steps=2, center_warmup=0, **SMALL))
    assert result.curves["cbns"] == [] and result.classes_with_center == 0


def test_learned_latents_are_optimised_and_are_what_the_images_are_drawn_from():
    model, layers, stats = setup()
    config = SynthConfig(method="generator", steps=2, num_images=10, latents="learned", **SMALL)
    a = train_generator(model, layers, stats, (1, 16, 16), config)
    latents, labels = a.latents
    assert latents.shape == (10, 8) and sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    start = train_generator(model, layers, stats, (1, 16, 16), replace(config, steps=0)).latents
    assert torch.equal(start[1], labels) and not torch.equal(start[0], latents)  # optimised
    x, y = generate(a.generator, 10, latents=a.latents)
    assert torch.equal(y, labels) and x.shape == (10, 1, 16, 16)
    b = train_generator(model, layers, stats, (1, 16, 16), config)
    assert torch.equal(b.latents[0], latents) and a.curves == b.curves


def test_synthesis_choices_are_checked():
    with pytest.raises(ConfigError, match="generator_output 'warp'; choices: batchnorm, range"):
        SynthConfig(generator_output="warp")
    with pytest.raises(ConfigError, match="bns_scale"):
        SynthConfig(bns_scale="log")
    model, layers, stats = setup()
    with pytest.raises(ConfigError, match="input range"):
        train_generator(model, layers, stats, (1, 16, 16), SynthConfig(steps=1, generator_output="range", **SMALL))


def test_generator_steps_lower_the_loss():
    model, layers, stats = setup()
    config = SynthConfig(steps=60, lr=1e-2, **SMALL)
    curves = train_generator(model, layers, stats, (1, 16, 16), config).curves["total"]
    assert sum(curves[-10:]) / 10 < sum(curves[:10]) / 10


def test_quality_probe_scores_real_images_against_their_own_centers():
    model, layers, stats = setup()
    probe = QualityProbe(model, layers, stats, start=1)
    images = torch.randn(8, 1, 16, 16)
    q = probe.measure(images, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    assert q.images == 8 and 0 <= q.separation <= 100 and q.diversity > 0
    # identical images in a class: no diversity
    same = probe.measure(images[:1].repeat(4, 1, 1, 1), torch.tensor([0, 0, 0, 0]))
    assert same.diversity == pytest.approx(0.0, abs=1e-6)


def test_separation_counts_images_nearest_their_own_class_center():
    """Centers of one image each: those images sit on their own centers (100%); labelled as
    another class each, none does (0%); an image of a class without a center is not counted."""
    torch.manual_seed(0)
    model = randomize_bn(TinyResNet(num_classes=4))
    layers = batchnorm_layers(model, torch.zeros(1, 1, 16, 16))
    images = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    probe = QualityProbe(model, layers, class_statistics(model, layers, images, torch.tensor([0, 1, 2]), 4), start=1)
    assert probe.measure(images, torch.tensor([0, 1, 2])).separation == 100.0
    assert probe.measure(images, torch.tensor([1, 2, 0])).separation == 0.0
    partial = probe.measure(images, torch.tensor([0, 2, 3]))  # the second is nearest class 1's center
    assert partial.images == 3 and partial.separation == 50.0


def test_a_dimension_constant_over_real_images_does_not_dominate_the_quality_distances():
    real = torch.randn(20, 6)
    real[:, 0] = 3.0  # a dead channel
    offset, unit = feature_scale(real)
    assert unit[0].item() == pytest.approx(0.1 * real.std(0).median().item())
    assert torch.equal(unit[1:], real.std(0)[1:].clamp(min=unit[0].item()))
    assert feature_scale(real[:1]) is None


def test_pool_starts_from_views_of_each_class_own_images_and_noise_elsewhere():
    real = torch.stack([torch.full((1, 8, 8), float(k)) for k in (0, 1, 2)])
    labels = torch.tensor([0, 1, 2])
    images, pool_labels = initial_pool(real, labels, torch.tensor([0, 1, 2, 3]), 12, 0.0, torch.Generator().manual_seed(0))
    assert sorted(pool_labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for k in (0, 1, 2):  # shifted and mirrored constant images stay the class's constant
        assert torch.all(images[pool_labels == k] == float(k))
    assert images[pool_labels == 3].std() > 0.5  # no real image: noise


def test_pool_is_seeded_covers_the_classes_with_images_and_lowers_the_loss():
    model, layers, stats = setup()
    real, labels = torch.randn(8, 1, 16, 16), stats.labels
    config = SynthConfig(method="pool", steps=40, num_images=24, batch_size=8, pool_lr=0.05)
    a = optimize_pool(model, layers, stats, real, labels, config)
    b = optimize_pool(model, layers, stats, real, labels, config)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2].curves == b[2].curves
    assert a[0].shape == (24, 1, 16, 16) and set(a[1].tolist()) == {0, 1, 2}  # class 3 has no image
    assert len(a[2].curves["cbns"]) == 40 and a[2].generator is None
    total = a[2].curves["total"]
    assert sum(total[-5:]) / 5 < sum(total[:5]) / 5
    assert all(p.requires_grad for p in model.parameters())  # teacher restored


def test_row_adam_moves_only_the_drawn_images_and_is_adam_for_an_image_drawn_every_step():
    torch.manual_seed(0)
    pool, target = torch.randn(3, 4), torch.randn(3, 4)
    reference = pool[0].clone().requires_grad_(True)
    adam, row_adam = torch.optim.Adam([reference], lr=0.1), RowAdam(pool, lr=0.1)
    for rows in ([0, 1], [0, 2], [0]):  # image 1 drawn at step 1 only, image 2 at step 2 only
        before = pool.clone()
        drawn = row_adam.draw(torch.tensor(rows))
        row_adam.zero_grad()
        (drawn - target[rows]).pow(2).sum().backward()
        row_adam.step()
        adam.zero_grad()
        (reference - target[0]).pow(2).sum().backward()
        adam.step()
        undrawn = [k for k in range(3) if k not in rows]
        assert torch.equal(pool[undrawn], before[undrawn])  # no momentum moves an image not drawn
        assert torch.allclose(pool[0], reference.detach(), atol=1e-5)
    assert row_adam.count.tolist() == [3, 1, 1]


def test_pool_pixels_stay_within_the_input_range():
    model, layers, stats = setup()
    real, labels = 3 * torch.randn(8, 1, 16, 16), stats.labels  # the start too goes beyond it
    config = SynthConfig(method="pool", steps=20, num_images=12, batch_size=8, pool_lr=0.5)
    bounds = (torch.full((1, 1, 1), -1.0), torch.full((1, 1, 1), 2.0))
    images = optimize_pool(model, layers, stats, real, labels, config, bounds=bounds)[0]
    assert images.min() == -1.0 and images.max() == 2.0
    assert optimize_pool(model, layers, stats, real, labels, config)[0].abs().max() > 2.0  # unbounded


def test_data_free_pool_starts_from_noise_over_every_class():
    model, layers, stats = setup()
    from fddaq.stats import ClassStatistics

    empty = ClassStatistics.without_images(layers, 4)
    config = SynthConfig(method="pool", steps=2, num_images=8, batch_size=4)
    images, labels, result = optimize_pool(model, layers, empty, torch.zeros(0, 1, 16, 16), torch.zeros(0, dtype=torch.long), config)
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3] and result.curves["cbns"] == []


def test_unknown_synthesis_method_is_a_config_error():
    from fddaq.errors import ConfigError

    with pytest.raises(ConfigError, match="synthesis method"):
        SynthConfig(method="diffusion")


def test_preview_rows_are_labelled_with_class_names():
    from fddaq.data import Preprocess
    from fddaq.synth.preview import preview_grid

    preprocess = Preprocess(channels=3, input_size=12, resize=12, mean=(0.5,) * 3, std=(0.25,) * 3)
    images, labels = torch.zeros(6, 3, 12, 12), torch.tensor([0, 0, 2, 2, 2, 0])
    plain = preview_grid(images, labels, preprocess, per_class=3)
    assert plain.shape == (2 * 14 - 2, 3 * 14 - 2, 3) and (plain[:12, :12] == 128).all() and (plain[12:14] == 255).all()
    named = preview_grid(images, labels, preprocess, ["sandal", "shirt", "a very long class name indeed, cut"], per_class=3)
    label_width = named.shape[1] - plain.shape[1]
    assert named.shape[0] == plain.shape[0] and label_width > 10
    assert (named[:, label_width:] == plain).all()
    column = named[:, :label_width]
    assert (column[:12] < 128).any() and (column[14:] < 128).any()  # dark text in both rows


@pytest.mark.parametrize("method, latents", [("pool", "fresh"), ("generator", "fresh"), ("generator", "learned")])
def test_an_interrupted_synthesis_resumes_to_the_same_result(method, latents):
    model, layers, stats = setup()
    real, labels = torch.randn(8, 1, 16, 16), stats.labels
    config = SynthConfig(method=method, steps=7, num_images=12, checkpoint_every=3, latents=latents, **SMALL)

    def run(on_checkpoint=None, resume=None):
        if method == "pool":
            return optimize_pool(model, layers, stats, real, labels, config, on_checkpoint=on_checkpoint, resume=resume)
        result = train_generator(model, layers, stats, (1, 16, 16), config, on_checkpoint=on_checkpoint, resume=resume)
        return (*generate(result.generator, 12, latents=result.latents), result)

    states = []
    straight = run(states.append)
    assert [s["step"] for s in states] == [3, 6]  # none after the last step
    resumed = run(resume=states[0])
    assert torch.equal(straight[0], resumed[0]) and torch.equal(straight[1], resumed[1])
    assert straight[2].curves == resumed[2].curves
    if method == "pool":  # a state is a copy: the run that handed it out went on without changing it
        assert not torch.equal(states[0]["images"], straight[0])


def test_the_generator_learning_rate_drops_tenfold_at_each_milestone():
    model, layers, stats = setup()
    config = SynthConfig(steps=8, checkpoint_every=1, lr=1e-3, lr_milestones=(0.25, 0.75), **SMALL)
    states = []
    train_generator(model, layers, stats, (1, 16, 16), config, on_checkpoint=states.append)
    rates = [state["optimizer"]["param_groups"][0]["lr"] for state in states]  # after steps 1..7
    assert rates == pytest.approx([1e-3, 1e-4, 1e-4, 1e-4, 1e-4, 1e-5, 1e-5])  # milestones at steps 2 and 6
