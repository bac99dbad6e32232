"""Batched inference with a resident model, on CUDA when present."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sorter.dicom.pixels import DecodedImage
from sorter.domain import Label, Prediction
from sorter.errors import BlankImage, ModelError
from sorter.model.artefact import DEFAULT_MODEL_PATH, file_sha256, require_file
from sorter.model.devices import device_problem, is_cpu
from sorter.model.graph_cache import GraphCache
from sorter.model.ort import OnnxRunner, logits_per_instance
from sorter.model.preprocess import prepare_image
from sorter.model.spec import ModelSpec
from sorter.taxonomy import header_label

if TYPE_CHECKING:
    from sorter.config import Settings
    from sorter.model.runtime import Runner

log = logging.getLogger(__name__)

#: Device nodes of the GPU drivers torch can use (NVIDIA, AMD ROCm, WSL 2): with
#: none of them CUDA cannot be available, and asking torch would cost its import.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def pick_device(requested: str | None = None) -> str:
    """``requested`` if given, else ``cuda`` when available, else ``cpu``.

    Raises
    ------
    ModelError
        ``requested`` cannot run here (torch said only "Found no NVIDIA driver on your system").
    """
    if is_cpu(requested):
        return "cpu"  # as device_problem reads it: "CPU" passed the check, then torch refused it
    problem = device_problem(requested)
    if problem is not None:
        raise ModelError(f"device {problem}")
    if not requested and "torch" not in sys.modules and not any(map(os.path.exists, GPU_DEVICE_NODES)):
        return "cpu"
    import torch

    if requested:
        return str(torch.device(requested))
    return "cuda" if torch.cuda.is_available() else "cpu"


class Classifier:
    """A loaded model that turns decoded images into calibrated predictions.

    Create it once per process (after any fork) and keep it: loading costs
    far more than a batch. :meth:`load` builds one from an artefact file.

    Parameters
    ----------
    spec
        The model's self-description.
    runner
        Its forward pass (:mod:`sorter.model.runtime`).
    device
        Where the forward pass runs (``cpu``, ``cuda``, ``cuda:1`` ...).
    path, sha256
        The artefact file and its sha256, the model's identity in the database.
    """

    def __init__(self, spec: ModelSpec, runner: Runner, *, device: str, path: Path, sha256: str) -> None:
        self.spec = spec
        self.runner = runner
        self.device = device
        self.path = path
        self.sha256 = sha256

    @classmethod
    def load(
        cls,
        path: Path | str | None = None,
        device: str | None = None,
        runtime: str = "auto",
        *,
        threads: int | None = None,
        cache: GraphCache | None = None,
    ) -> Classifier:
        """Load ``path`` (the bundled default when None) to run on ``device`` (default: CUDA when available).

        ``runtime``: see :mod:`sorter.model.runtime`. ``threads``: CPU threads
        of the forward pass (default: all cores). With a ``cache``, a CPU run on
        ONNX Runtime takes the exported graph from it, and then does not import
        torch at all; a run that exports stores its graph there.
        """
        path = Path(path) if path else DEFAULT_MODEL_PATH
        require_file(path)
        device = pick_device(device)
        if device == "cpu" and runtime in ("auto", "onnx"):
            sha256 = file_sha256(path)
            # The graph shipped beside the artefact (`sorter-train export` writes it; the bundled
            # model's is in the package), then the user's cache: a CPU node needs no torch at all.
            for graphs in (GraphCache(path.parent, read_only=True), cache):
                cached = _from_cache(graphs, sha256, threads) if graphs is not None else None
                if cached is not None:
                    spec, onnx = cached
                    return cls(spec, onnx, device=device, path=path, sha256=sha256)
        try:
            import torch
        except ImportError as exc:
            raise ModelError(
                f"{path} has no ONNX graph beside it and PyTorch is not installed: install it "
                "(pip install 'dicom-sorter[gpu]'), or export the model with `sorter-train export`, "
                "which writes the graph next to the artefact"
            ) from exc

        from sorter.model.artefact import load_artefact
        from sorter.model.runtime import make_runner

        model = load_artefact(path)
        runner = make_runner(model.network, model.spec, torch.device(device), runtime, threads)
        if cache is not None and isinstance(runner, OnnxRunner):
            cache.put(model.sha256, model.spec.to_dict(), runner.graph)
        return cls(model.spec, runner, device=device, path=path, sha256=model.sha256)

    @classmethod
    def from_settings(cls, settings: Settings, threads: int | None = None) -> Classifier:
        """The model, device and runtime ``settings`` name, with the user's graph cache."""
        return cls.load(
            settings.model,
            settings.device,
            settings.runtime,
            threads=threads,
            cache=GraphCache(settings.graph_cache_dir),
        )

    @property
    def labels(self) -> tuple[Label, ...]:
        """Labels in output order."""
        return self.spec.labels

    def prepare(self, image: DecodedImage) -> tuple[np.ndarray, np.ndarray]:
        """Preprocess every frame of ``image``: arrays (k, C, S, S) and (k, F)."""
        return prepare_image(
            image.frames, image.colourfulness, self.spec.preprocess, image.shape, image.grid_step
        )

    def predict_arrays(self, images: np.ndarray, features: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (N, L) for preprocessed inputs."""
        if len(images) == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return self.calibrate(self.runner(images, features))

    def calibrate(self, logits: np.ndarray) -> np.ndarray:
        """Temperature-scaled softmax of logits (N, L), in float32."""
        scaled = np.asarray(logits, dtype=np.float32) / np.float32(self.spec.temperature)
        exp = np.exp(scaled - scaled.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)

    def logits_prepared(
        self, prepared: Sequence[tuple[np.ndarray, np.ndarray]], headers: Sequence[Label | None] | None = None
    ) -> list[np.ndarray]:
        """Logits (k, L) per instance from :meth:`prepare` outputs, in one forward pass.

        ``headers``: each instance's header label, which a model whose partner confirms headers
        takes beside the pixels (:class:`sorter.model.spec.PartnerSpec`); others ignore them.
        """
        codes = None if headers is None else self.spec.header_codes(headers)
        return logits_per_instance(self.runner, [p[0] for p in prepared], [p[1] for p in prepared], codes)

    def predict_logits(self, logits: Sequence[np.ndarray]) -> list[Prediction]:
        """One prediction per instance from its frames' logits (k, L); frames are averaged."""
        if not logits:
            return []
        probs = self.calibrate(np.concatenate(logits))
        out, start = [], 0
        for frames in logits:
            out.append(self.to_prediction(probs[start : start + len(frames)].mean(axis=0)))
            start += len(frames)
        return out

    def predict_prepared(
        self, prepared: Sequence[tuple[np.ndarray, np.ndarray]], headers: Sequence[Label | None] | None = None
    ) -> list[Prediction]:
        """One prediction per image from :meth:`prepare` outputs; frames are averaged."""
        return self.predict_logits(self.logits_prepared(prepared, headers))

    def predict_images(
        self,
        images: Sequence[DecodedImage | np.ndarray],
        headers: Sequence[Label | str | None] | None = None,
    ) -> list[Prediction]:
        """Classify decoded images in one batched forward pass (``headers``: see :meth:`logits_prepared`).

        An image is a :class:`~sorter.dicom.pixels.DecodedImage` or an array that
        :meth:`DecodedImage.from_array` takes: ``(H, W)`` in modality units, or ``(H, W, 3)`` RGB.
        A header is a :class:`Label`, a Modality value as the header holds it (``"DX"`` reads as
        XR, ``"ct"`` as CT; one outside the taxonomy as no header) or ``None``.

        Blank frames (one value in every pixel) are left out of a multi-frame image, as a scan
        leaves them out; an image with nothing else raises ``ValueError``: nothing in it shows what
        made it, and any label the model gave it would be a guess.
        """
        # One image or one header where a list belongs failed deep inside: a row of pixels "not
        # (H, W)", an ONNX Runtime GatherElements error, a NumPy broadcast error.
        if isinstance(images, (np.ndarray, DecodedImage)):
            raise TypeError("images is a list of images: pass [image] for one")
        if isinstance(headers, (str, Label)):
            raise TypeError("headers is a list, one per image: pass [header] for one")
        if headers is not None and len(headers) != len(images):
            raise ValueError(f"{len(images)} images but {len(headers)} headers: give one header per image")
        decoded = [
            _not_blank(image if isinstance(image, DecodedImage) else DecodedImage.from_array(image), index)
            for index, image in enumerate(images)
        ]
        labels = None if headers is None else [_header(header) for header in headers]
        return self.predict_prepared([self.prepare(image) for image in decoded], labels)

    def to_prediction(self, probs: np.ndarray) -> Prediction:
        """Top-2 view of one probability vector."""
        return top_two(probs, self.labels)


def _not_blank(image: DecodedImage, index: int) -> DecodedImage:
    """``image`` without its blank frames; ``ValueError`` naming ``images[index]`` when all are."""
    try:
        return image.without_blank_frames(f"images[{index}]")
    except BlankImage as exc:
        raise ValueError(f"images[{index}] is blank: {exc.detail}") from None


def _header(header: Label | str | None) -> Label | None:
    """A header as the model takes it: a Label, or a Modality value mapped as a scan maps it (a
    lower-case 'ct' or a 'DX' was silently read as no header)."""
    return header if header is None or isinstance(header, Label) else header_label(header)


def top_two(probs: np.ndarray, labels: Sequence[Label]) -> Prediction:
    """The prediction of one probability vector over ``labels``: its top two and every probability."""
    order = np.argsort(-probs)
    first, second = int(order[0]), int(order[1])
    return Prediction(
        label=labels[first],
        confidence=float(probs[first]),
        second_label=labels[second],
        second_confidence=float(probs[second]),
        probabilities={label: float(p) for label, p in zip(labels, probs, strict=True)},
    )


def _from_cache(cache: GraphCache, sha256: str, threads: int | None) -> tuple[ModelSpec, OnnxRunner] | None:
    """The spec and an ONNX Runtime runner from a cached graph, or ``None`` (then the caller exports)."""
    entry = cache.get(sha256)
    if entry is None:
        return None
    try:
        runner = OnnxRunner(entry.graph, threads or os.cpu_count() or 1)
    except ImportError:  # no onnxruntime: the export path falls back to torch, and says so
        return None
    except Exception as exc:  # ONNX Runtime refuses the graph: export a fresh one
        log.warning("cached graph for model %s refused (%s); exporting again", sha256[:12], exc)
        return None
    return entry.spec, runner
