"""Manifests: the CSV that lists training/evaluation images (ARCHITECTURE §6).

:func:`build_manifest` is the real-world path: users have DICOM archives, not curated
labels, so it walks a tree, reads headers only, and takes the label from the header
Modality through :mod:`sorter.taxonomy`. :func:`read_manifest` reads any manifest
(DICOM, NIfTI, NRRD, PNG/JPEG, TIFF, JPEG 2000) and validates it row by row.

Patient identifiers never leave this module: PatientID is read only to derive a hashed
``group`` for studies without a Study Instance UID.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from tqdm import tqdm

from sorter.domain import Label
from sorter.fspath import is_utf8
from sorter.manifests import RelativePaths, group_key, write_csv_atomic
from sorter.taxonomy import (
    expected_label,
    header_label,
    is_localizer,
    is_non_image_modality,
    normalise_modality,
)
from sorter.walk import walk

logger = logging.getLogger(__name__)

HEADER_TAGS: tuple[str, ...] = (
    "Modality",
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "InstitutionName",
    "StationName",
    "SOPInstanceUID",
    "ImageType",
)
MANIFEST_COLUMNS: tuple[str, ...] = ("path", "label", "header_modality", "source", "group", "format")
REQUIRED_COLUMNS: tuple[str, ...] = ("path", "label", "source", "group")
FORMATS: frozenset[str] = frozenset({"dcm", "nii", "nii.gz", "nrrd", "png", "jpg", "tif", "jp2"})
_ALIASES = {"jpeg": "jpg", "tiff": "tif", "dicom": "dcm", "nifti": "nii"}
_SUFFIX_FORMATS = {
    ".dcm": "dcm",
    ".dicom": "dcm",
    ".nii": "nii",
    ".nrrd": "nrrd",
    ".png": "png",
    ".jpg": "jpg",
    ".jpeg": "jpg",
    ".tif": "tif",
    ".tiff": "tif",
    ".jp2": "jp2",
}
#: Groups that open a raw (no preamble, no File Meta) DICOM data set: File Meta or Identifying.
_RAW_START_GROUPS = frozenset({0x0002, 0x0008})


@dataclass(frozen=True)
class ManifestSummary:
    """What :func:`build_manifest` wrote and what it skipped."""

    rows: int
    skipped: dict[str, int]
    labels: dict[str, int]
    sources_by_label: dict[str, dict[str, int]]


@dataclass(frozen=True)
class ManifestRow:
    """One validated manifest row; ``path`` is absolute, ``extra`` holds the other columns."""

    path: Path
    label: Label
    source: str
    group: str
    format: str
    extra: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class _Entry:  # one image-bearing instance found by the walk
    path: Path
    label: str
    header_modality: str
    source: str
    group: str
    series: str


def infer_format(path: str | Path) -> str:
    """Image format from a file name; unknown or missing extensions are DICOM.

    DICOM files in archives are often named by UID or ``IM0001`` with no extension,
    which is why anything unrecognised counts as ``dcm``.
    """
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return "nii.gz"
    return _SUFFIX_FORMATS.get(Path(name).suffix, "dcm")


def _starts_like_raw_dataset(path: Path) -> bool:
    """True when the first tag reads as group 0002/0008 in either byte order."""
    with path.open("rb") as fh:
        head = fh.read(2)
    return len(head) == 2 and bool({int.from_bytes(head, o) for o in ("little", "big")} & _RAW_START_GROUPS)


def _read_header(path: Path, tags: list[str]) -> Dataset | None:
    """Header without pixels, or ``None`` when the file is not DICOM."""
    try:
        return dcmread(path, stop_before_pixels=True, specific_tags=tags)
    except InvalidDicomError:
        if not _starts_like_raw_dataset(path):
            return None
    return dcmread(path, stop_before_pixels=True, specific_tags=tags, force=True)


def _text_of(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v).strip() for v in value)
    return "" if value is None else str(value).strip()


def _entry(path: Path, root: Path, ds: Dataset, source_from: str) -> _Entry | str:
    """A manifest entry, or the reason the file is skipped."""
    modality = normalise_modality(ds.get("Modality"))
    if modality is None:
        return "no_modality"
    if is_non_image_modality(modality):
        return "non_image"
    if header_label(modality) is None:
        return "unmapped_modality"
    # As a scan reads the header: a CT localizer is XR, and a secondary capture filed under its
    # study's CT or MR (a dose report page, a rendering) says nothing about what it shows.
    sop_class = _text_of(ds, "SOPClassUID") or None
    label = expected_label(modality, localizer=is_localizer(ds.get("ImageType")), sop_class_uid=sop_class)
    if label is None:
        return "secondary_capture"
    rel = path.relative_to(root)
    if source_from == "top_folder":
        source = rel.parts[0] if len(rel.parts) > 1 else root.name
    else:
        source = _text_of(ds, source_from) or UNKNOWN
    # Study first (the unit that must not straddle splits); PatientID only hashed, never written.
    key = _text_of(ds, "StudyInstanceUID") or _text_of(ds, "PatientID")
    group = group_key(key, rel.as_posix())
    series = _text_of(ds, "SeriesInstanceUID") or f"path:{rel.as_posix()}"
    return _Entry(path, label.value, modality, source, group, series)


def _evenly_spaced(entries: list[_Entry], limit: int) -> list[_Entry]:
    if len(entries) <= limit:
        return entries
    keep = np.unique(np.round(np.linspace(0, len(entries) - 1, num=limit)).astype(int))
    return [entries[i] for i in keep]


def _walk(root: Path, exclude: Path, skipped: Counter[str]) -> list[Path]:
    """The regular files under ``root``, walked as ``sorter scan`` walks (links to folders followed
    once: ``os.walk`` skipped them without a word); what is no readable file is counted in
    ``skipped`` by the scan's reason (a FIFO, a link loop, a broken link ...), and so is a file
    whose name is not valid UTF-8 (``name_not_utf8``; it stopped the writing with a traceback)."""
    files: list[Path] = []
    relative = RelativePaths(exclude)
    for entry in walk([root], exclude=frozenset({str(exclude)})):
        if entry.reason is not None:
            skipped[entry.reason] += 1
        elif not is_utf8(relative(entry.path)):  # a UTF-8 manifest cannot name it
            skipped["name_not_utf8"] += 1
        else:
            files.append(Path(entry.path))
    return files


def _write_csv(entries: list[_Entry], out_csv: Path) -> None:
    relative = RelativePaths(out_csv)
    write_csv_atomic(
        out_csv,
        MANIFEST_COLUMNS,
        ([relative(e.path), e.label, e.header_modality, e.source, e.group, "dcm"] for e in entries),
    )


def build_manifest(
    root: Path,
    out_csv: Path,
    source_from: str = "top_folder",
    limit_per_series: int | None = None,
    progress: bool = True,
) -> ManifestSummary:
    """Walk a DICOM tree and write a manifest labelled from the header Modality.

    Parameters
    ----------
    root
        Folder to walk recursively; files that are not DICOM are skipped.
    out_csv
        Manifest to write (columns ``path,label,header_modality,source,group,format``,
        ``path`` relative to its folder). Written atomically.
    source_from
        ``"top_folder"`` (first path component under ``root``) or a DICOM keyword such as
        ``"InstitutionName"``, ``"StationName"`` or ``"Manufacturer"``; empty values become
        ``"unknown"``.
    limit_per_series
        Keep at most this many evenly spaced instances per series (sorted by path).
    progress
        Show a tqdm progress bar.

    Returns
    -------
    ManifestSummary
        Rows written, rows by label, sources by label and skipped files by reason: ``not_dicom``,
        ``unreadable``, ``non_image``, ``no_modality``, ``unmapped_modality``, ``secondary_capture``,
        ``series_limit``,
        ``name_not_utf8`` (a manifest is UTF-8 text) and the walk's (``symlink_loop``,
        ``broken_symlink``, ``not_regular_file`` ...).
    """
    root = Path(root).resolve()
    out_csv = Path(out_csv).resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    if source_from != "top_folder" and tag_for_keyword(source_from) is None:
        raise ValueError(f"source_from must be 'top_folder' or a DICOM keyword, got {source_from!r}")
    if limit_per_series is not None and limit_per_series < 1:
        raise ValueError(f"limit_per_series must be positive, got {limit_per_series}")
    tags = list(HEADER_TAGS) + ([source_from] if source_from not in (*HEADER_TAGS, "top_folder") else [])

    skipped: Counter[str] = Counter()
    by_series: dict[str, list[_Entry]] = defaultdict(list)
    files = _walk(root, out_csv, skipped)
    for path in tqdm(files, desc="reading headers", unit="file", disable=not progress):
        try:
            ds = _read_header(path, tags)
            result = "not_dicom" if ds is None else _entry(path, root, ds, source_from)
        except Exception as exc:  # pydicom raises many types on damaged files; count and go on
            logger.debug("unreadable %s: %s", path, exc)
            result = "unreadable"
        if isinstance(result, str):
            skipped[result] += 1
        else:
            by_series[result.series].append(result)

    entries: list[_Entry] = []
    for series in by_series.values():
        series.sort(key=lambda e: e.path)
        kept = series if limit_per_series is None else _evenly_spaced(series, limit_per_series)
        skipped["series_limit"] += len(series) - len(kept)
        entries.extend(kept)
    entries.sort(key=lambda e: e.path)

    _write_csv(entries, out_csv)
    sources: dict[str, Counter[str]] = defaultdict(Counter)
    for e in entries:
        sources[e.label][e.source] += 1
    summary = ManifestSummary(
        rows=len(entries),
        skipped={reason: n for reason, n in sorted(skipped.items()) if n},
        labels=dict(sorted(Counter(e.label for e in entries).items())),
        sources_by_label={label: dict(sorted(c.items())) for label, c in sorted(sources.items())},
    )
    logger.info("wrote %d rows to %s; skipped %s", summary.rows, out_csv, summary.skipped)
    return summary


#: Fewer sources than this for a label and leave-sources-out cannot say how it does on a new one.
MIN_SOURCES = 3
#: Attributes that tell scanners apart when InstitutionName is anonymised or the tree is by modality.
SOURCE_HINTS = "StationName, Manufacturer, ManufacturerModelName or DeviceSerialNumber"
UNKNOWN = "unknown"


def source_problems(sources_by_label: dict[str, dict[str, int]]) -> list[str]:
    """Why leave-sources-out over these sources would measure little, one line per label.

    A label with fewer than :data:`MIN_SOURCES` sources cannot be tested on an unseen one, and a
    label more than half of whose files have no source (``unknown``) puts them all in one "source".
    """
    problems = []
    for label, sources in sorted(sources_by_label.items()):
        total = sum(sources.values())
        unknown = sources.get(UNKNOWN, 0)
        if 2 * unknown > total:
            problems.append(
                f"{label}: {unknown} of {total} files have no source (`{UNKNOWN}`): the attribute is "
                f"empty or anonymised; try --source-from {SOURCE_HINTS}"
            )
        elif len(sources) < MIN_SOURCES:
            problems.append(
                f"{label}: {len(sources)} source{'s' if len(sources) != 1 else ''} "
                f"({', '.join(sorted(sources))}), fewer than {MIN_SOURCES}: leave-sources-out cannot "
                f"measure {label} on an unseen source; a tree sorted by modality gives one per label: "
                f"try --source-from {SOURCE_HINTS}, or the sending calling AE"
            )
    return problems


def sources_of(rows: Sequence[ManifestRow]) -> dict[str, dict[str, int]]:
    """Files per source, per label, of manifest ``rows``."""
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for row in rows:
        out[row.label.value][row.source or UNKNOWN] += 1
    return {label: dict(c) for label, c in out.items()}


def _parse_row(record: dict[str | None, object], base: Path, line: int, where: Path) -> ManifestRow:
    def fail(message: str) -> ValueError:
        return ValueError(f"{where}, line {line}: {message}")

    if None in record:
        raise fail("more fields than columns in the header")
    values = {str(k): ("" if v is None else str(v).strip()) for k, v in record.items()}
    for column in REQUIRED_COLUMNS:
        if not values[column]:
            raise fail(f"empty {column!r}")
    try:
        label = Label(values["label"].upper())
    except ValueError:
        raise fail(f"unknown label {values['label']!r}; expected one of {[x.value for x in Label]}") from None
    fmt = values.get("format", "").lower()
    fmt = _ALIASES.get(fmt, fmt) if fmt else infer_format(values["path"])
    if fmt not in FORMATS:
        raise fail(f"unknown format {fmt!r}; expected one of {sorted(FORMATS)}")
    extra = {k: v for k, v in values.items() if k not in (*REQUIRED_COLUMNS, "format")}
    # normpath, not resolve(): keep symlinked data folders as the manifest names them.
    path = Path(os.path.normpath(base / values["path"]))
    return ManifestRow(path, label, values["source"], values["group"], fmt, extra)


def read_manifest(path: Path) -> list[ManifestRow]:
    """Read and validate a manifest CSV.

    Parameters
    ----------
    path
        The manifest. Required columns ``path,label,source,group``; ``format`` is inferred
        from the file extension when the column is absent or empty; other columns go to
        ``ManifestRow.extra``.

    Returns
    -------
    list of ManifestRow
        Rows in file order, ``path`` made absolute against the manifest's folder.

    Raises
    ------
    ValueError
        For missing columns, or a bad row (empty required value, unknown label or
        format), naming the line number.
    """
    path = Path(path)
    base = path.resolve().parent
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing required column(s) {missing}")
        return [_parse_row(record, base, reader.line_num, path) for record in reader]
