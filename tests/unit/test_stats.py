import torch
from torch import nn

from fddaq.stats import (
    ClassStatistics,
    batchnorm_layers,
    class_statistics,
    deep_layer_start,
    image_statistics,
    record_bn_inputs,
)


class TwoBN(nn.Module):
    """Identity-weight 1x1 conv before each BN, so BN inputs are hand-computable."""

    def __init__(self):
        super().__init__()
        self.bn_late = nn.BatchNorm2d(2)  # registered first, called second
        self.conv = nn.Conv2d(2, 2, 1, bias=False)
        self.bn_early = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            self.conv.weight.copy_(2 * torch.eye(2).reshape(2, 2, 1, 1))

    def forward(self, x):
        x = self.bn_early(x)  # BN in eval with default stats: identity up to eps
        x = self.bn_late(self.conv(x))
        return self.fc(x.mean((2, 3)))


def test_layers_in_execution_order():
    names = [name for name, _ in batchnorm_layers(TwoBN(), torch.zeros(1, 2, 4, 4))]
    assert names == ["bn_early", "bn_late"]


def test_hooks_equal_hand_computed_per_image_statistics():
    model = TwoBN().eval()
    layers = batchnorm_layers(model, torch.zeros(1, 2, 2, 2))
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 8.0]]]])  # (1, 2, 2, 2)
    means, variances, _ = image_statistics(model, layers, x)
    assert means[0].tolist() == [[2.5, 2.0]]
    assert variances[0].tolist() == [[1.25, 12.0]]  # biased: mean of squared deviations
    scale = 2 / (1 + 1e-5) ** 0.5  # conv doubles the (eval-BN-normalised) input
    assert torch.allclose(means[1], means[0] * scale)
    assert torch.allclose(variances[1], variances[0] * scale**2)


def test_batch_statistics_pool_over_images_and_keep_gradients():
    model = TwoBN().eval()
    layers = batchnorm_layers(model, torch.zeros(1, 2, 2, 2))
    x = torch.randn(3, 2, 2, 2, requires_grad=True)
    with record_bn_inputs(layers, per_image=False) as stats:
        model(x)
    mean, var = stats[0]
    assert torch.allclose(mean, x.mean((0, 2, 3))) and torch.allclose(var, x.var((0, 2, 3), unbiased=False))
    (mean.sum() + var.sum()).backward()
    assert x.grad is not None


def test_deep_layer_rule_matches_the_paper():
    assert deep_layer_start(20) == 8  # ResNet-18
    assert deep_layer_start(52) == 24  # MobileNetV2
    assert deep_layer_start(1) == 0


def make_stats(correct):
    means = [torch.tensor([[1.0], [3.0], [10.0], [5.0]])]
    variances = [torch.tensor([[2.0], [4.0], [20.0], [6.0]])]
    return ClassStatistics(means, variances, torch.tensor([0, 0, 1, 0]), torch.tensor(correct), num_classes=3)


def test_class_centers_average_images_and_skip_classes_without_any():
    mean_c, var_c, has = make_stats([True, True, True, True]).centers(exclude_misclassified=False)
    assert mean_c[0][:, 0].tolist() == [3.0, 10.0, 0.0]
    assert var_c[0][:, 0].tolist() == [4.0, 20.0, 0.0]
    assert has.tolist() == [True, True, False]  # class 2 has no calibration image


def test_misclassified_images_leave_the_centers_and_can_empty_a_class():
    stats = make_stats([True, False, False, True])
    assert stats.misclassified == 2
    mean_c, _, has = stats.centers(exclude_misclassified=True)
    assert mean_c[0][0, 0].item() == 3.0  # (1 + 5) / 2
    assert has.tolist() == [True, False, False]
    assert stats.centers(exclude_misclassified=False)[2].tolist() == [True, True, False]


def test_class_statistics_marks_the_float_models_mistakes():
    model = TwoBN().eval()
    layers = batchnorm_layers(model, torch.zeros(1, 2, 2, 2))
    x = torch.randn(6, 2, 2, 2)
    predicted = model(x).argmax(1)
    labels = predicted.clone()
    labels[0] = (labels[0] + 1) % 3
    stats = class_statistics(model, layers, x, labels, 3)
    assert stats.correct.tolist() == [False, True, True, True, True, True]
