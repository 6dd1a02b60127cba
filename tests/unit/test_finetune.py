import torch

from fddaq.config import CalibrationConfig, FinetuneConfig
from fddaq.evaluate import predict
from fddaq.finetune import augment, distillation_loss, finetune
from fddaq.quant.calibrate import calibrate
from tests.conftest import fake_quant_model


def test_distillation_loss_is_zero_for_equal_logits_and_positive_otherwise():
    a = torch.randn(8, 5)
    assert distillation_loss(a, a, 4.0).abs().item() < 1e-6
    assert distillation_loss(a, torch.randn(8, 5), 1.0).item() > 0


def test_augment_shifts_and_flips_each_image_and_is_seeded():
    """Each image is a crop of itself reflect-padded by 1/8 of its size, flipped or not; the
    images are not all left as they were."""
    import torch.nn.functional as F

    x = torch.arange(16 * 3 * 8 * 8, dtype=torch.float32).reshape(16, 3, 8, 8)
    a = augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, augment(x, torch.Generator().manual_seed(1)))
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    for i in range(16):
        crops = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(a[i], c) or torch.equal(a[i], c.flip(-1)) for c in crops), i
    assert sum(not torch.equal(a[i], x[i]) for i in range(16)) >= 12


def test_calibration_sets_finite_positive_scales(tiny_model):
    qmodel = fake_quant_model(tiny_model, weight_bits=4, act_bits=4)
    calibrate(qmodel, torch.randn(32, 1, 16, 16), CalibrationConfig(max_samples=1000))
    assert [layer.name for layer in qmodel.layers] == ["conv1", "conv2", "short", "fc"]
    for layer in qmodel.layers:
        for q in (layer.weight_quant, layer.input_quant):
            assert torch.isfinite(q.scale()).all() and (q.scale() > 0).all()
    assert qmodel.quant_layer("conv2").input_quant.zero_point.item() == 0  # after a ReLU


def test_finetune_lowers_distillation_loss_and_is_deterministic(tiny_model):
    images = torch.randn(64, 1, 16, 16)
    results = []
    for _ in range(2):
        student = fake_quant_model(tiny_model, weight_bits=2, act_bits=2)
        calibrate(student, images, CalibrationConfig(bias_images=0))  # fine-tuning alone (bias correction: test_bias)
        before = distillation_loss(predict(student, images), predict(tiny_model, images), 1.0).item()
        config = FinetuneConfig(steps=60, batch_size=16, weight_lr=1e-3, scale_lr=1e-2, seed=3)
        result = finetune(student, tiny_model, (images, torch.zeros(64, dtype=torch.long)), config)
        after = distillation_loss(predict(student, images), predict(tiny_model, images), 1.0).item()
        results.append((before, after, predict(student, images)))
        assert result.steps == 60 and result.selection == "last step"
    assert results[0][1] < results[0][0]
    assert torch.equal(results[0][2], results[1][2])
    # BN statistics stay frozen
    assert all(not p.requires_grad for p in student.model.bn1.parameters())
