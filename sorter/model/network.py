"""Network factory: torchvision backbones with a stem for our channel count.

Every backbone is built without pretrained weights (there is nothing to
download on a hospital network, and ImageNet colour statistics do not
transfer to a 1-channel stem anyway). The classifier head sees the pooled
backbone features concatenated with the spec's scalar features.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import nn
from torchvision import models

from sorter.model.spec import ModelSpec


def _replace_conv(conv: nn.Module, in_chans: int) -> nn.Conv2d:
    assert isinstance(conv, nn.Conv2d)
    return nn.Conv2d(
        in_chans,
        conv.out_channels,
        kernel_size=cast(tuple[int, int], conv.kernel_size),
        stride=cast(tuple[int, int], conv.stride),
        padding=cast(tuple[int, int], conv.padding),
        bias=conv.bias is not None,
    )


def _resnet(factory: Callable[..., models.ResNet], in_chans: int) -> tuple[nn.Module, int]:
    net = factory(weights=None)
    net.conv1 = _replace_conv(net.conv1, in_chans)
    width = net.fc.in_features
    net.fc = cast(nn.Linear, nn.Identity())
    return net, width


def _vgg16_bn(in_chans: int) -> tuple[nn.Module, int]:
    net = models.vgg16_bn(weights=None)
    net.features[0] = _replace_conv(net.features[0], in_chans)
    last = net.classifier[6]
    assert isinstance(last, nn.Linear)
    net.classifier[6] = nn.Identity()
    return net, last.in_features


def _first_conv_then_linear_head(net: nn.Module, in_chans: int, head_index: int) -> tuple[nn.Module, int]:
    # EfficientNet and MobileNetV3 share this layout: features[0][0] is the stem
    # convolution and classifier[head_index] the final Linear.
    features = cast(nn.Sequential, net.features)
    stem = cast(nn.Sequential, features[0])
    stem[0] = _replace_conv(stem[0], in_chans)
    classifier = cast(nn.Sequential, net.classifier)
    last = classifier[head_index]
    assert isinstance(last, nn.Linear)
    classifier[head_index] = nn.Identity()
    return net, last.in_features


_BACKBONES: dict[str, Callable[[int], tuple[nn.Module, int]]] = {
    "resnet18": lambda c: _resnet(models.resnet18, c),
    "resnet34": lambda c: _resnet(models.resnet34, c),
    "resnet50": lambda c: _resnet(models.resnet50, c),
    "vgg16_bn": _vgg16_bn,
    "efficientnet_b0": lambda c: _first_conv_then_linear_head(models.efficientnet_b0(weights=None), c, 1),
    "mobilenet_v3_small": lambda c: _first_conv_then_linear_head(
        models.mobilenet_v3_small(weights=None), c, 3
    ),
    "mobilenet_v3_large": lambda c: _first_conv_then_linear_head(
        models.mobilenet_v3_large(weights=None), c, 3
    ),
}


class SorterNet(nn.Module):
    """Backbone plus a linear head over [pooled features, scalar features]."""

    def __init__(self, backbone: nn.Module, width: int, n_features: int, n_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.n_features = n_features
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(width + n_features, n_classes)

    def forward(self, image: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Return logits for a batch of images (N, C, S, S) and features (N, F)."""
        pooled = self.backbone(image)
        if self.n_features:
            if features is None:
                raise ValueError("this model expects scalar features beside the image")
            pooled = torch.cat([pooled, features.to(pooled.dtype)], dim=1)
        return self.head(self.dropout(pooled))


def build_network(spec: ModelSpec) -> SorterNet:
    """Build the (untrained) network that ``spec`` describes."""
    backbone, width = _BACKBONES[spec.arch](len(spec.preprocess.channels))
    for module in backbone.modules():
        # torchvision's MobileNetV3/EfficientNet use momentum 0.01, tuned for
        # ImageNet-length runs; on a few hundred steps the running statistics
        # would still describe the untrained network. Training also
        # recalibrates them at the end (train.fit.recalibrate_batchnorm).
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    return SorterNet(backbone, width, len(spec.preprocess.features), len(spec.labels))
