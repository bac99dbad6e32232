"""Read the header attributes of an instance without its pixel data.

Only the elements :class:`~sorter.domain.InstanceHeader` needs are read
(``specific_tags``); patient-identifying attributes are never read.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pydicom.dataset import Dataset

from sorter.compare import witnesses_of
from sorter.dicom import lean
from sorter.dicom.nonimage import MEDIA_STORAGE_DIRECTORY, non_image_reason
from sorter.dicom.reading import read_dataset, transfer_syntax_of
from sorter.domain import InstanceHeader
from sorter.taxonomy import expected_label, is_localizer

logger = logging.getLogger(__name__)

__all__ = ["HEADER_TAGS", "header_from_dataset", "non_image_reason", "read_header"]

#: The elements a header read asks pydicom for. (0004,1130) and (0004,1200) are
#: here only to recognise a DICOMDIR whose File Meta Information is missing.
HEADER_TAGS: tuple[str, ...] = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "InstitutionName",
    "StationName",
    "ImageType",
    "RadiopharmaceuticalInformationSequence",
    "FileSetID",
    "OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity",
)


def _value(ds: Dataset, keyword: str) -> Any:
    """Return the element's value, or ``None`` when it is absent or cannot be parsed."""
    try:
        return ds.get(keyword)
    except Exception as exc:  # a malformed value must not cost us the rest of the header
        logger.debug("unparseable %s: %s", keyword, exc)
        return None


def _text(ds: Dataset, keyword: str) -> str | None:
    value = _value(ds, keyword)
    if value is None:
        return None
    text = str(value).strip("\x00 ")
    return text or None


def _int(ds: Dataset, keyword: str) -> int | None:
    value = _value(ds, keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _sop_class_uid(ds: Dataset) -> str | None:
    """SOP Class UID, else the Media Storage SOP Class UID, else DICOMDIR when it looks like one."""
    uid = _text(ds, "SOPClassUID")
    if uid is None:
        meta = getattr(ds, "file_meta", None)
        uid = _text(meta, "MediaStorageSOPClassUID") if meta is not None else None
    if uid is None and ("FileSetID" in ds or "DirectoryRecordSequence" in ds):
        uid = MEDIA_STORAGE_DIRECTORY
    return uid


def _radionuclide_code(ds: Dataset) -> Dataset | None:
    """The first radiopharmaceutical code with a Code Value (0054,0016) > (0054,0300), as the lean
    reader finds it; ``None`` without one."""
    try:
        for item in ds.get("RadiopharmaceuticalInformationSequence") or ():
            for code in item.get("RadionuclideCodeSequence") or ():
                if _text(code, "CodeValue") is not None:
                    return code
    except Exception as exc:  # a malformed sequence must not cost us the rest of the header
        logger.debug("unparseable radiopharmaceutical: %s", exc)
    return None


def _radionuclide(ds: Dataset) -> str | None:
    """The radionuclide's code value (:func:`_radionuclide_code`)."""
    code = _radionuclide_code(ds)
    return None if code is None else _text(code, "CodeValue")


def header_from_dataset(ds: Dataset, path: str | os.PathLike[str]) -> InstanceHeader:
    """Build an :class:`~sorter.domain.InstanceHeader` from an already-read data set.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A data set from a file or from a C-STORE request; pixel data is not touched.
    path : str or os.PathLike
        Where the instance is (or will be) stored.

    Returns
    -------
    InstanceHeader
        Missing or unparseable attributes are ``None``; a missing or invalid
        Number of Frames counts as 1.
    """
    frames = _int(ds, "NumberOfFrames")
    return InstanceHeader(
        path=os.fspath(path),
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        sop_class_uid=_sop_class_uid(ds),
        modality=_text(ds, "Modality"),
        transfer_syntax_uid=str(transfer_syntax_of(ds)),
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        number_of_frames=frames if frames is not None and frames > 0 else 1,
        institution_name=_text(ds, "InstitutionName"),
        station_name=_text(ds, "StationName"),
        localizer=is_localizer(_value(ds, "ImageType")),
        radionuclide=_radionuclide(ds),
    )


def read_header(path: str | os.PathLike[str]) -> InstanceHeader:
    """Read the header of a DICOM file without its pixel data.

    Parameters
    ----------
    path : str or os.PathLike
        A DICOM Part 10 file, or a data set without preamble and File Meta
        Information (ACR-NEMA style), whose transfer syntax is then guessed.

    Returns
    -------
    InstanceHeader
        The identifying and routing attributes; patient attributes are never read.

    Raises
    ------
    UnreadableFile
        The file is missing or cannot be opened.
    NotDicom
        The file is not DICOM (text, PNG, empty, ...).
    TruncatedFile
        The file ends inside the header.
    """
    common = lean.read_header(os.fspath(path))
    if common is not None:  # the common case, without pydicom: the same header at a fifth of the cost
        return common
    ds = read_dataset(path, specific_tags=HEADER_TAGS)
    return header_from_dataset(ds, path)


#: What the review page shows of a series, value for value: acquisition context, never patient
#: attributes.
_SHOWN_TAGS: tuple[str, ...] = (
    "Modality",
    "SOPClassUID",
    "StationName",
    "InstitutionName",
    "Manufacturer",
    "ManufacturerModelName",
    "SeriesDescription",
    "BodyPartExamined",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "NumberOfFrames",
)
#: What the review page reads: the shown values, and the radionuclide it names (with its meaning).
DESCRIBE_TAGS: tuple[str, ...] = (*_SHOWN_TAGS, "RadiopharmaceuticalInformationSequence")


def describe_series(path: str | os.PathLike[str]) -> dict[str, str]:
    """The header fields a reviewer needs, read from one instance of a series (no pixel data).

    Only :data:`DESCRIBE_TAGS` and the transfer syntax are read; a file that cannot be read
    gives ``{"error": reason}`` instead of raising, since the page shows what it can.
    """
    from pydicom.uid import UID

    try:
        ds = read_dataset(path, specific_tags=DESCRIBE_TAGS)
    except Exception as exc:  # the page shows the reason; the database still has the rest
        return {"error": f"cannot read the header: {type(exc).__name__}"}
    out: dict[str, str] = {}
    for keyword in _SHOWN_TAGS:
        text = _text(ds, keyword)
        if text is not None:
            out[keyword] = UID(text).name if keyword == "SOPClassUID" else text
    sop_class, code = _text(ds, "SOPClassUID"), _radionuclide_code(ds)
    code_value = None if code is None else _text(code, "CodeValue")
    label = expected_label(out.get("Modality"), sop_class_uid=sop_class)
    said = witnesses_of(out.get("Modality"), sop_class, label, code_value)
    if said.contradicted_by:  # the verdict may rest on it (sorter.compare): the reviewer sees why
        allows = " or ".join(sorted(x.value for x in said.contradicted_by))
        out["SOPClassUID"] += f" (allows {allows}, not the Modality)"
    if code is not None:  # its meaning (^18^Fluorine), else its value
        out["Radionuclide"] = _text(code, "CodeMeaning") or str(code_value)
        if said.nuclide_allows:
            out["Radionuclide"] += f" (imaged by {' or '.join(sorted(x.value for x in said.nuclide_allows))})"
        elif said.nuclide_confirms and label is not None:
            out["Radionuclide"] += f" (imaged by {label.value}, as the Modality says)"
    syntax = transfer_syntax_of(ds)
    if syntax:
        out["TransferSyntax"] = UID(str(syntax)).name
    return out
