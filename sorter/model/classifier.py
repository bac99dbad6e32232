"""Batched inference with a resident model, on CUDA when present."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sorter.dicom.pixels import DecodedImage
from sorter.domain import Label, Prediction
from sorter.model.artefact import LoadedModel, load_artefact
from sorter.model.ort import logits_per_instance
from sorter.model.preprocess import prepare_image
from sorter.model.runtime import Runner, make_runner
from sorter.model.spec import ModelSpec


def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` if given, else CUDA when available, else the CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Classifier:
    """A loaded model that turns decoded images into calibrated predictions.

    Create it once per process (after any fork) and keep it: loading costs
    far more than a batch.
    """

    def __init__(self, model: LoadedModel, device: str | None = None, runtime: str = "auto") -> None:
        self.model = model
        self.spec: ModelSpec = model.spec
        self.device = pick_device(device)
        self.runner: Runner = make_runner(model.network, self.spec, self.device, runtime)

    @classmethod
    def load(
        cls, path: Path | str | None = None, device: str | None = None, runtime: str = "auto"
    ) -> Classifier:
        """Load ``path`` (the bundled default when None); ``runtime``: see :mod:`sorter.model.runtime`."""
        return cls(load_artefact(Path(path) if path else None), device=device, runtime=runtime)

    @property
    def sha256(self) -> str:
        """Identity of the artefact file."""
        return self.model.sha256

    @property
    def labels(self) -> tuple[Label, ...]:
        """Labels in output order."""
        return self.spec.labels

    def prepare(self, image: DecodedImage) -> tuple[np.ndarray, np.ndarray]:
        """Preprocess every frame of ``image``: arrays (k, C, S, S) and (k, F)."""
        return prepare_image(image.frames, image.colourfulness, self.spec.preprocess)

    def predict_arrays(self, images: np.ndarray, features: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (N, L) for preprocessed inputs."""
        if len(images) == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return self.calibrate(self.runner(images, features))

    def calibrate(self, logits: np.ndarray) -> np.ndarray:
        """Temperature-scaled softmax of logits (N, L)."""
        return torch.softmax(torch.from_numpy(logits) / self.spec.temperature, dim=1).numpy()

    def logits_prepared(self, prepared: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """Logits (k, L) per instance from :meth:`prepare` outputs, in one forward pass."""
        return logits_per_instance(self.runner, [p[0] for p in prepared], [p[1] for p in prepared])

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

    def predict_prepared(self, prepared: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[Prediction]:
        """One prediction per image from :meth:`prepare` outputs; frames are averaged."""
        return self.predict_logits(self.logits_prepared(prepared))

    def predict_images(self, images: Sequence[DecodedImage]) -> list[Prediction]:
        """Classify decoded images in one batched forward pass."""
        return self.predict_prepared([self.prepare(image) for image in images])

    def to_prediction(self, probs: np.ndarray) -> Prediction:
        """Top-2 view of one probability vector."""
        order = np.argsort(-probs)
        first, second = int(order[0]), int(order[1])
        return Prediction(
            label=self.labels[first],
            confidence=float(probs[first]),
            second_label=self.labels[second],
            second_confidence=float(probs[second]),
            probabilities={label: float(p) for label, p in zip(self.labels, probs, strict=True)},
        )
