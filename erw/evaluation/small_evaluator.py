"""The small evaluator of small datasets: a CNN whose features give the Fréchet distance and whose
logits give the class accuracy of generated images (the role Inception plays on ImageNet).

Trained by `erw fit-evaluator` with another architecture, seed and split than the alignment
encoder, so the evaluation never scores the representation the model was aligned to.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from erw.evaluation.features import save_feature_network
from erw.models.small_nets import FitReport, FitSettings, SmallNetError, fit_classifier, num_classes


class DigitEvaluator(nn.Module):
    """uint8 images [N, 3, R, R] -> (features [N, 4 * width], logits [N, classes]).

    A strided 3x3 stem, then 3x3 convolutions with group norm, halving the resolution twice; the
    features are the global average of the last one (the role of Inception's pool3). Group norm,
    not batch norm: no running statistics, so a short training evaluates as it trained."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        if width < 4 or width % 4:
            raise SmallNetError(f"evaluator width {width} must be a positive multiple of 4 (4 norm groups)")

        def conv(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.GroupNorm(4, c_out), nn.GELU()]

        self.body = nn.Sequential(
            *conv(3, width, stride=2),
            *conv(width, 2 * width),
            nn.MaxPool2d(2),
            *conv(2 * width, 4 * width),
            nn.MaxPool2d(2),
            *conv(4 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.body(images.float() / 127.5 - 1)
        return features, self.head(features)


class _LogitsOnly(nn.Module):
    def __init__(self, net: DigitEvaluator):
        super().__init__()
        self.net = net

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)[1]


def fit_evaluator(
    images: Tensor, labels: Tensor, settings: FitSettings, width: int = 16, log: Callable[[str], None] = print
) -> tuple[DigitEvaluator, FitReport]:
    torch.manual_seed(settings.seed)
    net = DigitEvaluator(num_classes(labels), width)
    report = fit_classifier(_LogitsOnly(net), images, labels, settings, log)
    return net.eval(), report


def save_evaluator(net: DigitEvaluator, uri: str, resolution: int) -> None:
    """Write the evaluator for `erw evaluate --feature-network uri` (a torch.export program)."""
    save_feature_network(net, uri, resolution)
