"""Modality-safe augmentation of a batch, in torch.

Geometry: random resized crop, small rotation, horizontal flip (mirror images
exist in every modality). Intensity: gamma, contrast, noise, blur and 8-bit
quantisation, applied to the scaled channel. Nothing here inverts grey levels
or adds colour: those would turn one modality into the look of another.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sorter.model.spec import PreprocessParams

_HU_LOW, _HU_HIGH = -1000.0, 2000.0


def _scale(x: torch.Tensor, params: PreprocessParams) -> torch.Tensor:
    flat = x.flatten(1)
    if params.scaling == "minmax":
        low, high = flat.min(dim=1).values, flat.max(dim=1).values
    else:
        q = torch.tensor([params.p_low / 100, params.p_high / 100], dtype=x.dtype, device=x.device)
        low, high = torch.quantile(flat, q, dim=1)
    span = (high - low).clamp_min(1e-6)
    out = ((x - low[:, None, None]) / span[:, None, None]).clamp(0, 1)
    return torch.where((high - low)[:, None, None] > 1e-6, out, torch.zeros_like(out))


def _geometry(raw: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    n = raw.shape[0]
    scale = torch.empty(n).uniform_(0.75, 1.0, generator=gen)
    aspect = torch.exp(torch.empty(n).uniform_(-0.1, 0.1, generator=gen))
    angle = torch.empty(n).uniform_(-10, 10, generator=gen) * math.pi / 180
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    sx, sy = scale * aspect.sqrt() * flip, scale / aspect.sqrt()
    tx = (1 - scale) * torch.empty(n).uniform_(-1, 1, generator=gen)
    ty = (1 - scale) * torch.empty(n).uniform_(-1, 1, generator=gen)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([cos * sx, -sin * sy, tx], 1), torch.stack([sin * sx, cos * sy, ty], 1)], 1
    )
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    # Pad with each image's minimum (its background after the Modality LUT).
    low = raw.flatten(1).min(dim=1).values[:, None, None, None]
    out = F.grid_sample(raw[:, None] - low, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (out + low)[:, 0]


def _intensity(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    gamma = torch.exp(torch.empty(n, 1, 1).uniform_(-0.35, 0.35, generator=gen))
    x = x.clamp(0, 1) ** gamma
    contrast = torch.empty(n, 1, 1).uniform_(0.85, 1.15, generator=gen)
    bright = torch.empty(n, 1, 1).uniform_(-0.05, 0.05, generator=gen)
    x = (x - 0.5) * contrast + 0.5 + bright
    blur = (torch.rand(n, generator=gen) < 0.2)[:, None, None]
    x = torch.where(blur, F.avg_pool2d(x[:, None], 3, 1, 1, count_include_pad=False)[:, 0], x)
    noise = torch.empty(n, 1, 1).uniform_(0, 0.03, generator=gen)
    x = x + noise * torch.randn(x.shape, generator=gen)
    # Many sources reach archives as 8-bit exports: make bit depth uninformative.
    quant = (torch.rand(n, generator=gen) < 0.3)[:, None, None]
    x = torch.where(quant, torch.round(x * 255) / 255, x)
    return x.clamp(0, 1)


def augment_batch(
    raw: torch.Tensor, features: torch.Tensor, params: PreprocessParams, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment cached frames (B, R, R) in physical units into network input (B, C, S, S)."""
    small = _geometry(raw.float(), params.input_size, gen)
    channels = []
    for name in params.channels:
        if name == "scaled":
            channels.append(_intensity(_scale(small, params), gen))
        else:
            channels.append(((small - _HU_LOW) / (_HU_HIGH - _HU_LOW)).clamp(0, 1))
    feats = features.clone()
    if feats.shape[1]:
        keep = (torch.rand(feats.shape[0], 1, generator=gen) > 0.1).float()
        feats = feats * keep
    return torch.stack(channels, 1), feats
