"""Classify DICOM files straight from disk, without a database (``sorter classify``).

Each file is read once: header and pixels come from the same data set.
Results follow the ARCHITECTURE §6 JSON contract.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sorter.compare import compare, witnesses_of
from sorter.dicom import native
from sorter.dicom.headers import header_from_dataset
from sorter.dicom.nonimage import non_image_reason
from sorter.dicom.pixels import DecodedImage, decode_dataset
from sorter.dicom.reading import read_dataset
from sorter.domain import InstanceHeader, Status
from sorter.errors import InputError, NonImageObject
from sorter.model.classifier import Classifier
from sorter.taxonomy import label_of
from sorter.walk import Entry, distinct_roots, walk

log = logging.getLogger(__name__)


def iter_files(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Entry]:
    """Every file under ``paths`` as ``sorter scan`` walks it, under the names the user gave.

    :func:`sorter.walk.walk` does the walking (links to folders followed once, a loop or a broken
    link an entry with its reason, FIFOs and devices ``not_regular_file``), so both commands see the
    same files; ``os.walk`` here skipped linked folders and unreadable ones without a word. A path
    given twice, or inside another given path, is walked once, under the name it was first given.
    """
    given = list(paths)
    distinct, seen = set(distinct_roots(given)), set()
    for raw in given:
        absolute = os.path.abspath(raw)
        if absolute not in distinct or absolute in seen:
            continue
        seen.add(absolute)
        for entry in walk([raw]):
            # walk() makes paths absolute; show them as given (``sorter classify a`` prints a/...).
            shown = (os.fspath(raw).rstrip(os.sep) or os.sep) + entry.path[len(absolute) :]
            yield replace(entry, path=str(Path(shown)))  # as pathlib writes it: no "./", no "//"


@dataclass(frozen=True)
class Decoded:
    """A file that decoded to an image, ready for the batched forward pass."""

    path: str
    header: InstanceHeader
    image: DecodedImage


def decode_file(path: Path, frames: int = 1, min_side: int | None = None) -> Decoded | dict[str, Any]:
    """Read one file; return a :class:`Decoded` or the contract's status object.

    ``min_side``: decode JPEG 2000 and JPEG frames at a reduced resolution whose long side is at
    least this (:func:`sorter.dicom.pixels.load_image`); ``None``: in full.
    """
    said: list[str] = []  # what C decoders wrote, where the command caught it (sorter.dicom.native)
    try:
        ds = read_dataset(path)
        header = header_from_dataset(ds, path)
        reason = non_image_reason(header)
        if reason:
            raise NonImageObject(str(path), reason)
        with native.caught() as said:
            image = decode_dataset(ds, str(path), frames=frames, min_side=min_side)
            image = image.without_blank_frames(str(path))
        return Decoded(str(path), header, image)
    except InputError as exc:
        status = Status.SKIPPED if isinstance(exc, NonImageObject) else Status.FAILED
        detail = native.with_said(exc.detail, said)
        log.info("%s %s: %s", status.value, path, exc)
        return {"path": str(path), "status": status.value, "reason": exc.reason, "detail": detail}


def _status_record(entry: Entry) -> dict[str, Any]:
    """The contract's status object for a path the walk could not read as a file."""
    return {"path": entry.path, "status": entry.status.value, "reason": entry.reason, "detail": entry.detail}


def result_record(item: Decoded, classifier: Classifier, prediction: Any) -> dict[str, Any]:
    """The JSON object for one classified instance (ARCHITECTURE §6)."""
    label, header = label_of(item.header), item.header
    witnesses = witnesses_of(header.modality, header.sop_class_uid, label, header.radionuclide)
    verdict = compare(label, prediction, classifier.labels, classifier.spec.thresholds, witnesses)
    contradicted_by, nuclide_allows = witnesses.contradicted_by, witnesses.nuclide_allows
    return {
        "path": item.path,
        "sop_instance_uid": item.header.sop_instance_uid,
        "header_modality": item.header.modality,
        "header_label": label.value if label else None,
        "label": prediction.label.value,
        "confidence": round(prediction.confidence, 4),
        "top2": [
            [prediction.label.value, round(prediction.confidence, 4)],
            [prediction.second_label.value, round(prediction.second_confidence, 4)],
        ],
        "verdict": verdict.value,
        # What the SOP class allows when it contradicts the Modality (None: it does not).
        "class_allows": sorted(label.value for label in contradicted_by) if contradicted_by else None,
        # The radionuclide's code value, and what it allows when it rules the header out.
        "radionuclide": item.header.radionuclide,
        "nuclide_allows": sorted(label.value for label in nuclide_allows) if nuclide_allows else None,
        # Whether it is one only the header's scanner images (then PT and NM pixels alike agree).
        "nuclide_confirms": witnesses.nuclide_confirms,
    }


def classify_paths(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    classifier: Classifier,
    batch_size: int = 32,
    frames: int = 1,
    full_decode: bool = False,
) -> Iterator[dict[str, Any]]:
    """Yield one record per file, in input order, inferring in batches of ``batch_size``.

    ``paths``: files or folders (folders are walked), or a single one. JPEG 2000 and JPEG frames
    are decoded at the reduced resolution that still covers the model's input, as a scan decodes
    them; ``full_decode`` decodes every pixel.
    """
    if isinstance(paths, (str, bytes, os.PathLike)):
        # One path, not a list: iterating "/archive" would classify "/", "a", "r" ... (the whole disk).
        paths = [os.fsdecode(paths)]
    if batch_size < 1 or frames < 1:
        raise ValueError(f"batch_size and frames must be at least 1 (got {batch_size} and {frames})")
    min_side = None if full_decode else classifier.spec.preprocess.input_size
    pending: list[Decoded | dict[str, Any]] = []

    def flush() -> Iterator[dict[str, Any]]:
        decoded = [item for item in pending if isinstance(item, Decoded)]
        headers = [label_of(item.header) for item in decoded]
        predictions = iter(classifier.predict_images([item.image for item in decoded], headers))
        for item in pending:
            yield result_record(item, classifier, next(predictions)) if isinstance(item, Decoded) else item
        pending.clear()

    for entry in iter_files(paths):
        if entry.reason is not None:  # a FIFO would block the read for ever, a device never end
            log.info("%s %s: %s (%s)", entry.status.value, entry.path, entry.reason, entry.detail)
            pending.append(_status_record(entry))
        else:
            pending.append(decode_file(Path(entry.path), frames, min_side))
        if sum(isinstance(item, Decoded) for item in pending) >= batch_size:
            yield from flush()
    yield from flush()
