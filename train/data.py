"""Manifest -> decoded, cached training images.

Decoding the corpus (JPEG 2000, volumes, palette ultrasound ...) costs far
more than an epoch of a small network, so every file is decoded once, in a
process pool, into two arrays that are cached on disk:

* ``raw``: letterboxed frames resized to ``cache_size`` in physical units,
  the input of training-time augmentation;
* ``eval``: the exact serving input from :func:`preprocess_frame`, used for
  validation and evaluation so that the numbers we report are the numbers
  the service gets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from sorter.dicom.pixels import load_image
from sorter.errors import InputError
from sorter.model.preprocess import fit_square, preprocess_frame
from sorter.model.spec import PreprocessParams
from train.manifest import ManifestRow
from train.volumes import read_nifti, read_nrrd, read_picture

log = logging.getLogger(__name__)

# 3: JPEG 2000 / JPEG frames decoded at a reduced resolution; 4: on the stored grid; 5: no octave spare
CACHE_VERSION = 5


@dataclass(frozen=True)
class DecodeOptions:
    """How many 2-D images to draw from one file."""

    max_frames: int = 8  # multi-frame DICOM
    axial_slices: int = 24  # NIfTI / NRRD volumes
    reformat_slices: int = 4  # sagittal and coronal each, for volumes


@dataclass
class ImageSet:
    """Decoded images of a manifest, one row per 2-D image."""

    raw: np.ndarray  # (N, R, R) float32, physical units
    eval: np.ndarray  # (N, C, S, S) float32, serving input
    features: np.ndarray  # (N, F) float32
    labels: np.ndarray  # (N,) label strings
    sources: np.ndarray  # (N,) source strings
    groups: np.ndarray  # (N,) group strings
    rows: np.ndarray  # (N,) index of the manifest row the image came from
    failures: list[tuple[str, str]]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, mask: np.ndarray) -> ImageSet:
        """The images where ``mask`` is true."""
        return ImageSet(
            self.raw[mask],
            self.eval[mask],
            self.features[mask],
            self.labels[mask],
            self.sources[mask],
            self.groups[mask],
            self.rows[mask],
            self.failures,
        )


class Frames(NamedTuple):
    """One manifest row's grey frames in physical units, and how they were decoded."""

    frames: list[np.ndarray]
    colourfulness: float
    #: The stored ``(rows, columns)`` when the frames were decoded at a reduced resolution.
    shape: tuple[int, int] | None = None
    #: :attr:`sorter.dicom.DecodedImage.grid_step`.
    step: int = 1


def read_frames(row: ManifestRow, options: DecodeOptions, min_side: int | None = None) -> Frames:
    """Decode one manifest row into grey frames in physical units.

    DICOM JPEG 2000 and JPEG frames are decoded as a scan decodes them, at a reduced resolution
    whose long side covers ``min_side`` (:func:`sorter.dicom.pixels.load_image`); ``shape`` is
    then the stored ``(rows, columns)``, for the size features, and ``step`` where the samples
    sit on it (:func:`sorter.model.preprocess.cosited_box`).
    """
    fmt = row.format.lower()
    if fmt == "dcm":
        image = load_image(row.path, frames=options.max_frames, min_side=min_side)
        return Frames(list(image.frames), image.colourfulness, image.stored_shape, image.grid_step)
    if fmt in ("nii", "nii.gz"):
        return Frames(*read_nifti(row.path, options.axial_slices, options.reformat_slices))
    if fmt == "nrrd":
        return Frames(*read_nrrd(row.path, options.axial_slices, options.reformat_slices))
    return Frames(*read_picture(row.path))


def usable_frames(frames: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The frames an image set keeps, as finite float32: 2-D and at least 4 pixels on a side."""
    finite = (np.nan_to_num(frame.astype(np.float32)) for frame in frames)
    return [frame for frame in finite if frame.ndim == 2 and min(frame.shape) >= 4]


def _decode_one(
    args: tuple[int, ManifestRow, PreprocessParams, int, DecodeOptions],
) -> tuple[int, list[np.ndarray], list[np.ndarray], list[np.ndarray], str | None]:
    index, row, params, cache_size, options = args
    try:
        with warnings.catch_warnings():
            # pydicom warns about every non-conformant value in public test data; the
            # decode either works or fails below, and a failure is what gets reported.
            warnings.simplefilter("ignore", UserWarning)
            frames, colour, shape, step = read_frames(row, options, max(cache_size, params.input_size))
    except InputError as exc:
        return index, [], [], [], f"{exc.reason}: {exc.detail}"
    except Exception as exc:  # NIfTI/NRRD/Pillow raise many types; one bad file never stops a run
        return index, [], [], [], f"{type(exc).__name__}: {exc}"
    raws, evals, feats = [], [], []
    for frame in usable_frames(frames):
        image, feature = preprocess_frame(frame, colour, params, shape=shape, step=step)
        raws.append(fit_square(frame, cache_size, params, shape, step).astype(np.float32))
        evals.append(image)
        feats.append(feature)
    return index, raws, evals, feats, None if raws else "no usable 2-D frame"


def _cache_key(rows: Sequence[ManifestRow], params: PreprocessParams, size: int, opt: DecodeOptions) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_VERSION, params.__dict__, size, opt.__dict__], default=list).encode())
    for row in rows:
        stat = row.path.stat() if row.path.exists() else None
        digest.update(f"{row.path}|{row.label}|{row.source}|{row.group}|{stat and stat.st_size}".encode())
    return digest.hexdigest()[:20]


def load_image_set(
    rows: Sequence[ManifestRow],
    params: PreprocessParams,
    cache_size: int,
    options: DecodeOptions | None = None,
    cache_dir: Path | None = None,
    workers: int = 2,
    progress: bool = True,
) -> ImageSet:
    """Decode ``rows`` (or read them from the cache) into an :class:`ImageSet`.

    Files that fail to decode are reported in ``failures`` and left out; they
    never stop the run.
    """
    options = options or DecodeOptions()
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"images-{_cache_key(rows, params, cache_size, options)}.npz"
        if cache_file.exists():
            log.info("reading decoded images from %s", cache_file)
            with np.load(cache_file, allow_pickle=False) as data:
                failures = [tuple(x) for x in data["failures"].tolist()]
                return ImageSet(
                    data["raw"],
                    data["eval"],
                    data["features"],
                    data["labels"],
                    data["sources"],
                    data["groups"],
                    data["rows"],
                    failures,  # type: ignore[arg-type]
                )
    jobs = [(i, row, params, cache_size, options) for i, row in enumerate(rows)]
    results: list = [None] * len(rows)
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for result in tqdm(
            pool.map(_decode_one, jobs, chunksize=4),
            total=len(jobs),
            desc="decode",
            unit="file",
            disable=not progress,
        ):
            results[result[0]] = result
    raw, evl, feats, labels, sources, groups, index, failures = [], [], [], [], [], [], [], []
    for i, row in enumerate(rows):
        _, raws, evals, fs, error = results[i]
        if error:
            failures.append((str(row.path), error))
            log.warning("skipping %s: %s", row.path, error)
        for r, e, f in zip(raws, evals, fs, strict=True):
            raw.append(r), evl.append(e), feats.append(f)
            (
                labels.append(str(row.label)),
                sources.append(row.source),
                groups.append(row.group),
                index.append(i),
            )
    n_feat = len(params.features)
    image_set = ImageSet(
        np.stack(raw) if raw else np.zeros((0, cache_size, cache_size), np.float32),
        np.stack(evl) if evl else np.zeros((0, len(params.channels), params.input_size, params.input_size)),
        np.stack(feats) if feats else np.zeros((0, n_feat), np.float32),
        np.asarray(labels),
        np.asarray(sources),
        np.asarray(groups),
        np.asarray(index, dtype=np.int64),
        failures,
    )
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp.npz")
        np.savez(
            tmp,
            raw=image_set.raw,
            eval=image_set.eval,
            features=image_set.features,
            labels=image_set.labels,
            sources=image_set.sources,
            groups=image_set.groups,
            rows=image_set.rows,
            failures=np.asarray(failures, dtype=str).reshape(-1, 2),
        )
        tmp.replace(cache_file)
    return image_set
