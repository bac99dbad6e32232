"""Modality-safe augmentation of a batch, in torch.

Geometry: random resized crop, small rotation, horizontal flip (mirror images
exist in every modality). Intensity: gamma, contrast, noise, blur and 8-bit
quantisation, applied to the scaled channel. Nothing here adds colour.

Acquisition shift (``shift``, 0 = off): how archives really differ from one
another, applied in physical units before the channels are made, so the ``hu``
channel sees them too: reduced resolution, MONOCHROME1 mistakes (inverted grey
levels), collimation and black borders, burned-in text and annotations, and
8-bit windowed exports (PNG, JPEG) with lossy re-compression. Without the last
one, "8-bit values" identifies the sources that were exported as pictures
(several MG and OT collections) and a chest radiograph saved as PNG becomes OT.

Units (``units``, 0 = off): only CT's values have a physical scale (Hounsfield
units). A PET slice is stored in Bq/ml, in SUV or in counts, a SPECT in counts or
in whatever a template was normalised to, an MR in arbitrary units; through the
``hu`` channel the network otherwise learns each training source's scale as if it
were the label's (on the corpus: PET in SUV, 0 to 5, called NM; SPECT in counts
up to 10^5 called PT). A random gain on frames of the other labels makes that
scale uninformative while CT keeps its own. Measured on the corpus it raised
source-averaged recall but confirmed fewer right headers (README, The default
model), so it is off by default.

Polarity (``polarity``, 0 = off): nuclear medicine and PET are read in either
polarity. Planar scintigrams, SPECT and PET MIPs are displayed, printed and
exported black on white as often as white on black, while a CT, MR or ultrasound
image shown inverted is a mistake. Inverting frames of those labels at random
teaches the network that their polarity says nothing about them. Measured on the
corpus it got inverted scintigrams right but PET slices wrong, and confirmed fewer
right headers (README, The default model), so it is off by default.

Simulated SPECT (``spect_sim``, 0 = off): the corpus holds few tomographic SPECT sources
and the network calls most of them PT (README, "Where the errors are"). A PET frame
blurred, resampled on a gamma camera's matrix and redrawn with its counting noise is
what a SPECT of the same tracer distribution would look like; such frames are drawn in
place of NM frames, labelled NM.

Small fields of view (``zoom``, 0 = off): scanners reconstruct extremities, inner ears,
hearts and spines on a small field of view, with no air around the body. A network that
learnt CT from the air around a trunk calls such a slice something else (the sarcoma
study's extremity CT, cropped around the tumour, US). Cropping frames of the chosen labels
to a third to three fifths of their side teaches them without it. Placed anywhere in the
frame, such a crop of a trunk can hold air alone; ``zoom_on_body`` keeps it inside the body's
bounding box instead, as a scanner's small field of view is placed on the anatomy.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sorter.model.spec import PreprocessParams


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


#: The side of a ``zoom`` crop, as a fraction of the frame's (``_geometry`` draws 0.75 to 1 otherwise).
ZOOM_SCALE = (0.33, 0.6)
#: ``zoom_on_body``: a pixel is body when above this share of its frame's range (minimum to the
#: 99th percentile, so that a few bright pixels do not lift it): CT's soft tissue and table, not
#: its air.
BODY_LEVEL = 0.1


def _body_boxes(raw: torch.Tensor) -> torch.Tensor:
    """Each frame's body bounding box (N, 4: left, right, top, bottom) in ``affine_grid``'s -1 to 1.

    A frame with no pixel above the level (a blank frame) gets the whole frame.
    """
    n, h, w = raw.shape
    flat = raw.flatten(1).float()
    low = flat.min(dim=1).values
    high = torch.quantile(flat, 0.99, dim=1)
    body = (flat > (low + BODY_LEVEL * (high - low))[:, None]).view(n, h, w)
    edges = []
    for hits, size in ((body.any(dim=1), w), (body.any(dim=2), h)):
        first = hits.float().argmax(dim=1)
        last = size - 1 - hits.flip(1).float().argmax(dim=1)
        blank = ~hits.any(dim=1)
        first, last = torch.where(blank, 0, first), torch.where(blank, size - 1, last)
        edges += [2 * first / size - 1, 2 * (last + 1) / size - 1]
    return torch.stack(edges, 1)


def _geometry(
    raw: torch.Tensor,
    size: int,
    gen: torch.Generator,
    zoomable: torch.Tensor | None = None,
    zoom: float = 0.0,
    on_body: bool = False,
) -> torch.Tensor:
    n = raw.shape[0]
    scale = torch.empty(n).uniform_(0.75, 1.0, generator=gen)
    fires = torch.zeros(n, dtype=torch.bool)
    if zoom > 0 and zoomable is not None:  # nothing drawn when off: runs without it stay bit for bit
        fires = (torch.rand(n, generator=gen) < zoom) & zoomable
        scale = torch.where(fires, torch.empty(n).uniform_(*ZOOM_SCALE, generator=gen), scale)
    aspect = torch.exp(torch.empty(n).uniform_(-0.1, 0.1, generator=gen))
    angle = torch.empty(n).uniform_(-10, 10, generator=gen) * math.pi / 180
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    sx, sy = scale * aspect.sqrt() * flip, scale / aspect.sqrt()
    tx = (1 - scale) * torch.empty(n).uniform_(-1, 1, generator=gen)
    ty = (1 - scale) * torch.empty(n).uniform_(-1, 1, generator=gen)
    if on_body and bool(fires.any()):
        # The crop inside the body's box where it fits, centred on the body where it does not
        # (an extremity smaller than the field of view), and always inside the frame.
        box, half, reach = _body_boxes(raw[fires]), scale[fires], 1 - scale[fires]
        for axis, t in ((0, tx), (2, ty)):
            low, high = box[:, axis] + half, box[:, axis + 1] - half
            middle, fits = (box[:, axis] + box[:, axis + 1]) / 2, low <= high
            low, high = torch.where(fits, low, middle), torch.where(fits, high, middle)
            centre = low + (high - low) * torch.rand(len(half), generator=gen)
            t[fires] = centre.clamp(-reach, reach)
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


#: Probability of each acquisition-shift augmentation at ``shift=1``.
SHIFT_RATES = {"lowres": 0.15, "invert": 0.08, "border": 0.2, "text": 0.3, "export8": 0.3, "jpeg": 0.5}


def _uniform(low: float, high: float, gen: torch.Generator) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=gen))


def _randint(low: int, high: int, gen: torch.Generator) -> int:
    """An integer in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=gen))


def _lowres(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    size = x.shape[-1]
    small = max(8, round(size * _uniform(0.25, 0.6, gen)))
    down = F.interpolate(x[None, None], size=(small, small), mode="area")
    return F.interpolate(down, size=(size, size), mode="bilinear", align_corners=False)[0, 0]


def _border(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Collimation or a black frame: one or two bands at the image's minimum or maximum."""
    size, out = x.shape[-1], x.clone()
    value = x.min() if torch.rand(1, generator=gen) < 0.6 else x.max()
    for _ in range(_randint(1, 2, gen)):
        width = max(1, round(size * _uniform(0.03, 0.2, gen)))
        side = _randint(0, 3, gen)
        if side == 0:
            out[:width] = value
        elif side == 1:
            out[-width:] = value
        elif side == 2:
            out[:, :width] = value
        else:
            out[:, -width:] = value
    return out


def _text(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Burned-in text and markers: a few thin bright strokes, mostly near the edges."""
    size, out = x.shape[-1], x.clone()
    value = x.max()
    for _ in range(_randint(1, 5, gen)):
        h = _randint(1, max(2, size // 40), gen)
        w = _randint(size // 16, size // 3, gen)
        top = (
            _randint(0, size // 5, gen)
            if torch.rand(1, generator=gen) < 0.5
            else _randint(4 * size // 5, size - h, gen)
        )
        left = _randint(0, size - w, gen)
        # A dashed stroke reads as glyphs at this resolution.
        stroke = (torch.rand(w, generator=gen) < 0.7).to(x.dtype)
        out[top : top + h, left : left + w] = torch.where(
            stroke > 0, value, out[top : top + h, left : left + w]
        )
    return out


def _export8(x: torch.Tensor, gen: torch.Generator, jpeg: float) -> torch.Tensor:
    """A windowed 8-bit export (values 0-255 from here on), sometimes JPEG-compressed."""
    q = torch.tensor([_uniform(0.0, 0.05, gen), _uniform(0.95, 1.0, gen)], dtype=x.dtype)
    low, high = torch.quantile(x.flatten(), q)
    if high - low < 1e-6:
        return x
    v = ((x - low) / (high - low)).clamp(0, 1).mul(255).round()
    if torch.rand(1, generator=gen) < jpeg:
        # Pillow's libjpeg (torchvision's JPEG codec is deprecated since 0.29).
        buffer = io.BytesIO()
        Image.fromarray(v.to(torch.uint8).numpy()).save(buffer, "JPEG", quality=_randint(25, 95, gen))
        v = torch.from_numpy(np.asarray(Image.open(buffer), dtype=np.float32)).to(x.dtype)
    return v


def acquisition_shift(x: torch.Tensor, gen: torch.Generator, shift: float) -> torch.Tensor:
    """Apply the acquisition-shift augmentations to frames (B, S, S) in physical units."""
    if shift <= 0:
        return x
    out = []
    for frame in x:

        def fires(name: str) -> bool:
            return bool(torch.rand(1, generator=gen) < SHIFT_RATES[name] * shift)

        if fires("lowres"):
            frame = _lowres(frame, gen)
        if fires("invert"):
            frame = frame.max() + frame.min() - frame
        if fires("border"):
            frame = _border(frame, gen)
        if fires("text"):
            frame = _text(frame, gen)
        if fires("export8"):
            frame = _export8(frame, gen, min(1.0, SHIFT_RATES["jpeg"] * shift))
        out.append(frame)
    return torch.stack(out)


#: Labels whose stored values have a physical scale that tells them apart (Hounsfield units).
PHYSICAL_UNITS = frozenset({"CT"})

#: ``units`` draws a gain log-uniformly over this many decades either side of 1: the corpus's
#: non-CT sources peak anywhere from 1 (a PET template) to 10^5 (a SPECT in counts).
UNIT_DECADES = 3.0


def unit_gain(raw: torch.Tensor, unitless: torch.Tensor, gen: torch.Generator, rate: float) -> torch.Tensor:
    """Multiply each frame flagged ``unitless`` (B,), with probability ``rate``, by a random gain.

    The ``scaled`` channel is unchanged (percentiles scale with the frame); only what the ``hu``
    channel sees of the frame's absolute values moves. ``rate`` 0 draws nothing from ``gen``.
    """
    if rate <= 0:
        return raw
    n = raw.shape[0]
    fires = (torch.rand(n, generator=gen) < rate) & unitless
    gain = torch.pow(10.0, torch.empty(n).uniform_(-UNIT_DECADES, UNIT_DECADES, generator=gen))
    return raw * torch.where(fires, gain, torch.ones_like(gain))[:, None, None]


def polarity_flip(
    raw: torch.Tensor, flippable: torch.Tensor, gen: torch.Generator, rate: float
) -> torch.Tensor:
    """Invert each frame flagged ``flippable`` (B,), with probability ``rate``, in physical units.

    A frame's values v become max + min - v, as in an inverted export. Whole rows and columns at
    the frame's minimum (the letterbox bars a non-square frame was cached with) stay at the
    minimum: serving letterboxes an inverted picture with its own minimum too. ``rate`` 0 draws
    nothing from ``gen``.
    """
    if rate <= 0:
        return raw
    fires = (torch.rand(raw.shape[0], generator=gen) < rate) & flippable
    if not fires.any():
        return raw
    out = raw.clone()
    for index in torch.nonzero(fires).flatten().tolist():
        frame = raw[index]
        low, high = frame.min(), frame.max()
        bars = (frame == low).all(dim=1)[:, None] | (frame == low).all(dim=0)[None, :]
        out[index] = torch.where(bars, low, high + low - frame)
    return out


def augment_batch(
    raw: torch.Tensor,
    features: torch.Tensor,
    params: PreprocessParams,
    gen: torch.Generator,
    shift: float = 0.0,
    unitless: torch.Tensor | None = None,
    units: float = 0.0,
    flippable: torch.Tensor | None = None,
    polarity: float = 0.0,
    zoomable: torch.Tensor | None = None,
    zoom: float = 0.0,
    zoom_on_body: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment cached frames (B, R, R) in physical units into network input (B, C, S, S).

    ``unitless`` (B,) flags the frames whose label has no physical scale
    (:data:`PHYSICAL_UNITS`); ``units`` is the probability that such a frame gets a random gain
    (:func:`unit_gain`). ``flippable`` (B,) flags the frames whose label is read in either
    polarity (the configuration's ``polarity_labels``); ``polarity`` is the probability that such a frame is
    inverted (:func:`polarity_flip`). ``zoomable`` (B,) flags the frames whose label is reconstructed
    on a chosen field of view (the configuration's ``zoom_labels``); ``zoom`` is the probability
    that such a frame is cropped to a small field of view (:data:`ZOOM_SCALE`), inside the body's
    bounding box with ``zoom_on_body`` (:func:`_body_boxes`), anywhere otherwise.
    """
    raw = raw.float()
    if unitless is not None:
        raw = unit_gain(raw, unitless, gen, units)
    if flippable is not None:
        raw = polarity_flip(raw, flippable, gen, polarity)
    framed = _geometry(raw, params.input_size, gen, zoomable, zoom, zoom_on_body)
    small = acquisition_shift(framed, gen, shift)
    channels = []
    for name in params.channels:
        if name == "scaled":
            channels.append(_intensity(_scale(small, params), gen))
        else:
            low, high = params.hu_low, params.hu_high
            channels.append(((small - low) / (high - low)).clamp(0, 1))
    feats = features.clone()
    if feats.shape[1]:
        keep = (torch.rand(feats.shape[0], 1, generator=gen) > 0.1).float()
        feats = feats * keep
    return torch.stack(channels, 1), feats


#: ``spect_sim``'s draws. A gamma camera images the same tracer distributions as PET at about twice
#: the blur (10-15 mm FWHM against 5-7) on a 64 or 128 matrix, with one to two orders of magnitude
#: fewer counts per voxel: in a frame cached at 147 px over the field of view that is a further
#: Gaussian of 0.6 to 2.5 px, a matrix of 40 to 100 px, and Poisson noise at a peak of 8 to 400
#: counts. The shape of the cached frame stays: serving resizes a 64-matrix SPECT up the same way.
SPECT_SIGMA = (0.6, 2.5)
SPECT_MATRIX = (40, 100)
SPECT_PEAK_COUNTS = (8.0, 400.0)
#: The stored values are the counts times 10 to a power drawn from this range.
SPECT_STORED_DECADES = (0.0, 3.0)
#: Half the simulations are post-filtered, by a Gaussian of this many matrix pixels.
SPECT_POST_SIGMA = (0.5, 1.5)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur frames (B, S, S) with a separable Gaussian of ``sigma`` pixels, edges replicated."""
    # By hand rather than torchvision's gaussian_blur, which pads by reflection: this is the blur
    # the README's spect_sim runs measured, and a change of edge handling would move them.
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = F.pad(x[:, None], (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1))[:, 0]


def spect_from_pet(frame: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A PET frame (S, S) in physical units degraded to what a gamma camera would record: counts.

    The frame's minimum (its background and letterbox bars) becomes 0; the activity is blurred,
    sampled on a coarser matrix, scaled to a random peak count (the 99.5th percentile), drawn
    from a Poisson law, sometimes post-filtered, resized back to ``S`` as serving resizes a small
    matrix, and stored at a random scale.
    """
    size = frame.shape[-1]
    activity = (frame.float() - frame.min()).clamp_min(0)[None]
    activity = _gaussian_blur(activity, _uniform(*SPECT_SIGMA, gen))
    matrix = _randint(*SPECT_MATRIX, gen)
    activity = F.interpolate(activity[:, None], size=(matrix, matrix), mode="area")[:, 0]
    peak = torch.quantile(activity.flatten(), 0.995).clamp_min(1e-6)
    counts = math.exp(_uniform(math.log(SPECT_PEAK_COUNTS[0]), math.log(SPECT_PEAK_COUNTS[1]), gen))
    counts_image = torch.poisson(activity / peak * counts, generator=gen)
    if torch.rand(1, generator=gen) < 0.5:
        # Iterative reconstruction is post-filtered: the noise of a clinical SPECT is blobby, not white.
        counts_image = _gaussian_blur(counts_image, _uniform(*SPECT_POST_SIGMA, gen))
    up = F.interpolate(counts_image[:, None], size=(size, size), mode="bilinear", align_corners=False)
    # Reconstructions store counts at whatever scale the vendor chose (the corpus's SPECTs peak
    # at 124, 1 778 and 884 652): the hu channel must not learn "NM peaks at a few hundred".
    gain = 10 ** _uniform(*SPECT_STORED_DECADES, gen)
    return up[0, 0].clamp_min(0) * gain


def simulate_spect(
    raw: torch.Tensor,
    features: torch.Tensor,
    emission: torch.Tensor,
    donors_raw: torch.Tensor,
    donors_features: torch.Tensor,
    donors_weights: torch.Tensor,
    gen: torch.Generator,
    rate: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each frame flagged ``emission`` (B,), with probability ``rate``, by a simulated SPECT.

    The simulation is :func:`spect_from_pet` of a frame drawn from ``donors_raw`` (N, S, S: the
    training set's PET frames) with ``donors_weights`` (N,; the sampler's, so every PET source is
    as likely), whose features go with it. The label stays the flagged frame's (NM): the network
    sees SPECT-like images made from distributions it otherwise knows only as PET, so that blur,
    matrix and counting noise, which tell the two apart, are what it learns rather than the few
    SPECT sources' anatomy and scale. ``rate`` 0, no flagged frame or no donor draws nothing
    from ``gen``.
    """
    if rate <= 0 or len(donors_raw) == 0 or not emission.any():
        return raw, features
    fires = (torch.rand(raw.shape[0], generator=gen) < rate) & emission
    if not fires.any():
        return raw, features
    raw, features = raw.clone().float(), features.clone()
    for index in torch.nonzero(fires).flatten().tolist():
        donor = int(torch.multinomial(donors_weights, 1, generator=gen))
        raw[index] = spect_from_pet(donors_raw[donor], gen)
        features[index] = donors_features[donor]
    return raw, features
