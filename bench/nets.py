"""The benchmark's own networks, trained on Fashion-MNIST by `python -m bench.train`.

Both take the reference preprocessing (1 x 32 x 32, normalised, padded), so they share data
with the ResNet-18 reference. They are small enough to train on two CPU cores in minutes.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
             act: type[nn.Module] = nn.ReLU) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act()]


def vgg_style(classes: int = 10) -> nn.Module:
    """Three double-conv stages with max-pooling and a two-layer classifier (VGG's shape)."""
    layers: list[nn.Module] = []
    cin = 1
    for cout in (32, 64, 128):
        layers += [*_conv_bn(cin, cout), *_conv_bn(cout, cout), nn.MaxPool2d(2)]
        cin = cout
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, classes))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise, 1x1 linear projection, skip when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = _conv_bn(cin, hidden, 1, act=nn.ReLU6) if expand != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6)
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.body = nn.Sequential(*layers)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x) if self.skip else self.body(x)


def mobilenetv2_style(classes: int = 10) -> nn.Module:
    """MobileNetV2's inverted residuals, stages scaled down for 32 x 32 inputs."""
    stages = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 2, 2), (6, 64, 2, 2), (6, 96, 1, 1))  # expand, out, n, stride
    layers: list[nn.Module] = _conv_bn(1, 32, stride=2, act=nn.ReLU6)  # stride-2 stem, as in MobileNetV2
    cin = 32
    for expand, cout, repeats, stride in stages:
        for i in range(repeats):
            layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
            cin = cout
    layers += [*_conv_bn(cin, 256, 1, act=nn.ReLU6), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, classes)]
    return nn.Sequential(*layers)


NETWORKS: dict[str, Callable[[], nn.Module]] = {"vgg": vgg_style, "mobilenetv2": mobilenetv2_style}
