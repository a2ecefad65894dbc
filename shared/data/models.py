"""Model factories of the built-in tasks."""

from __future__ import annotations

from torch import nn


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters (those TRAK differentiates): the gradient dimension p."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def logistic_regression(in_features: int, num_classes: int) -> nn.Module:
    """Multinomial logistic regression: one linear layer on flattened inputs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))


def mlp(in_features: int, hidden: tuple[int, ...], num_classes: int) -> nn.Module:
    """A ReLU multilayer perceptron on flattened inputs."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def small_cnn(num_classes: int) -> nn.Module:
    """A two-convolution network for 1x28x28 images (18,378 parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=5),  # 24x24
        nn.ReLU(),
        nn.MaxPool2d(2),  # 12x12
        nn.Conv2d(16, 32, kernel_size=5),  # 8x8
        nn.ReLU(),
        nn.MaxPool2d(2),  # 4x4
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, num_classes),
    )
