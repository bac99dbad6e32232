"""Pictures for the review page: thumbnails with the serving preprocessing, and Grad-CAM overlays.

A thumbnail is what the model saw, at display size: the stored file decoded by the scan's own
decoder, letterboxed and intensity-scaled by the model's own preprocessing parameters (the
percentile window of its ``scaled`` channel), then resized for the screen. Grad-CAM needs the
network's gradients, hence torch; it is imported here only when an overlay is asked for, so the
web process stays small until then.
"""

from __future__ import annotations

import dataclasses
import io
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sorter.dicom.pixels import load_image
from sorter.errors import InputError
from sorter.model.preprocess import preprocess_frame
from sorter.model.spec import ModelSpec, PreprocessParams

#: Thumbnail side in pixels.
DISPLAY_SIZE = 256


class RenderError(RuntimeError):
    """A picture that cannot be made, with a one-line reason for the page."""


def display_params(spec: dict[str, Any] | None) -> PreprocessParams:
    """The model's preprocessing at display size, one ``scaled`` channel (the window it uses)."""
    params = ModelSpec.from_dict(spec).preprocess if spec else PreprocessParams()
    return dataclasses.replace(params, input_size=DISPLAY_SIZE, channels=("scaled",))


def _png(grey: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.clip(grey * 255.0 + 0.5, 0, 255).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _unreadable(exc: Exception) -> RenderError:
    """What kept the stored file from decoding, in words (never its path: paths may name patients);
    it said only the exception's class ("UnreadableFile")."""
    if not isinstance(exc, InputError):
        return RenderError(f"cannot decode the stored file ({type(exc).__name__})")
    words = f"{exc.reason}: {exc.detail}" if exc.detail else str(exc.reason)
    if isinstance(exc.__cause__, FileNotFoundError):
        words += "; it was deleted or moved since it was classified"
    return RenderError(f"cannot decode the stored file ({words})")


def thumbnail(path: str, spec: dict[str, Any] | None) -> bytes:
    """A PNG of the instance at ``path`` as the model ``spec`` preprocesses it, at display size."""
    try:
        image = load_image(path, frames=1, min_side=DISPLAY_SIZE)
    except Exception as exc:  # any decode failure becomes a one-line reason on the page
        raise _unreadable(exc) from exc
    channels, _ = preprocess_frame(image.frames[0], image.colourfulness, display_params(spec), finite=True)
    return _png(channels[0])


def artefact_path(stored: str | None) -> Path:
    """Where the artefact of a ``models`` row lies: the bundled one in this install, else its path."""
    from sorter.db.catalogue import is_bundled
    from sorter.model.artefact import DEFAULT_MODEL_PATH

    if stored is None or is_bundled(stored):
        return DEFAULT_MODEL_PATH
    return Path(stored)


_lock = threading.Lock()


@lru_cache(maxsize=2)
def _network(path: str, sha256: str) -> Any:
    from sorter.model.artefact import load_artefact

    loaded = load_artefact(Path(path))
    if loaded.sha256 != sha256:
        raise RenderError(f"the model file at {path} is not the one that made this prediction")
    return loaded


def grad_cam(path: str, model_path: str | None, sha256: str, label: str) -> bytes:
    """A PNG of the thumbnail with the Grad-CAM map of ``label`` over it (the model of ``sha256``).

    Uses the maintained ``grad-cam`` package (pytorch-grad-cam) on the backbone's last
    convolutional block; the map is computed at the model's input size and upscaled.
    """
    try:
        import torch
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.image import show_cam_on_image
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as exc:
        raise RenderError("Grad-CAM needs torch and grad-cam: pip install 'dicom-sorter[review]'") from exc
    try:
        loaded = _network(str(artefact_path(model_path)), sha256)
    except RenderError:
        raise
    except Exception as exc:  # a missing or unreadable artefact: say which
        raise RenderError(f"cannot load the model for Grad-CAM: {exc}") from exc
    spec: ModelSpec = loaded.spec
    if label not in [lab.value for lab in spec.labels]:
        raise RenderError(f"the model has no label {label}")
    try:
        image = load_image(path, frames=1, min_side=spec.preprocess.input_size)  # as the scan decoded it
    except Exception as exc:
        raise _unreadable(exc) from exc
    x, features = preprocess_frame(
        image.frames[0],
        image.colourfulness,
        spec.preprocess,
        finite=True,
        shape=image.shape,
        step=image.grid_step,
    )
    net = loaded.network

    class _ImageOnly(torch.nn.Module):
        """The network with this image's scalar features fixed: Grad-CAM passes one tensor."""

        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.features = torch.from_numpy(features)[None]

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.net(image, self.features.expand(image.shape[0], -1))

    layer = _last_conv_block(net.backbone)
    # Hooks on a shared network: one overlay at a time.
    with _lock, GradCAM(model=_ImageOnly(), target_layers=[layer]) as cam:
        heat = cam(
            input_tensor=torch.from_numpy(x)[None],
            targets=[ClassifierOutputTarget([lab.value for lab in spec.labels].index(label))],
        )[0]
    size = DISPLAY_SIZE
    grey = Image.fromarray((x[0] * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
    rgb = np.repeat(np.asarray(grey, dtype=np.float32)[..., None] / 255.0, 3, axis=-1)
    heat_up = np.asarray(
        Image.fromarray(heat.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR)
    )
    out = io.BytesIO()
    Image.fromarray(show_cam_on_image(rgb, np.clip(heat_up, 0, 1), use_rgb=True, image_weight=0.6)).save(
        out, format="PNG"
    )
    return out.getvalue()


def _last_conv_block(backbone: Any) -> Any:
    """The backbone's last convolution: the finest spatial map that still sees the whole image
    (Grad-CAM's usual choice)."""
    import torch

    last = None
    for module in backbone.modules():
        if isinstance(module, torch.nn.Conv2d):
            last = module
    if last is None:
        raise RenderError("the model has no convolution to explain")
    return last
