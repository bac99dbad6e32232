"""Which DICOM objects carry no image to classify (ARCHITECTURE §3: status ``skipped``).

The SOP Class UID decides when pydicom knows it; the Modality tag
(:func:`sorter.taxonomy.is_non_image_modality`) decides for private or
missing SOP classes.
"""

from __future__ import annotations

from pydicom.uid import UID

from sorter.domain import InstanceHeader
from sorter.taxonomy import is_non_image_modality, normalise_modality

#: Media Storage Directory Storage: a DICOMDIR (PS3.10 §8.6).
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

#: Substrings of SOP class names (PS3.6 Annex A) that mark objects without an image,
#: checked in order, and the reason each gives. "SR" comes before "Radiation" so that
#: dose reports read as SR; RT image classes are let through before the RT entries.
_NON_IMAGE_NAMES: tuple[tuple[str, str], ...] = (
    (" SR ", "SR"),
    ("Key Object", "KO"),
    ("Presentation State", "PR"),
    ("Segmentation", "SEG"),
    ("Waveform", "waveform"),
    ("Encapsulated", "encapsulated document"),
    ("Raw Data", "raw data"),
    ("Spatial Registration", "REG"),
    ("Spatial Fiducials", "FID"),
    ("Real World Value Mapping", "RWV"),
    ("RT Structure", "RT"),
    ("RT Plan", "RT"),
    ("RT Ion Plan", "RT"),
    ("RT Dose", "RT"),
    ("Record", "RT"),
    ("Radiation", "RT"),
    ("RT Physician Intent", "RT"),
    ("RT Segment Annotation", "RT"),
    ("Delivery Instruction", "RT"),
    ("RT Treatment Preparation", "RT"),
    ("RT Patient Position", "RT"),
    ("Procedure Log", "SR"),
    ("Report", "report"),
    ("Measurements", "measurements"),
    ("Calculations", "measurements"),
    ("Spectroscopy", "spectroscopy"),
    ("Surface Scan", "surface"),
    ("Tractography", "tractography"),
    ("Stereometric", "stereometric"),
    ("Annotation", "annotation"),
    ("Content Assessment", "assessment"),
    ("Structured Display", "display"),
    ("Hanging Protocol", "hanging protocol"),
    ("Procedure Protocol", "protocol"),
    ("Protocol Approval", "protocol"),
    ("Color Palette", "palette"),
    ("Template", "implant template"),
    ("Inventory", "inventory"),
    ("Standalone", "standalone"),
    ("Stored Print", "print"),
)


def _sop_class_name(uid: str) -> str | None:
    """The registered name of `uid`, or ``None`` for a private or unknown UID."""
    name = UID(uid).name
    return None if name == uid else name


def non_image_reason(header: InstanceHeader) -> str | None:
    """Say why an instance carries no image to classify, or return ``None``.

    Parameters
    ----------
    header : InstanceHeader
        The header read by :func:`sorter.dicom.headers.read_header`; for a
        DICOMDIR its ``sop_class_uid`` is the Media Storage SOP Class UID.

    Returns
    -------
    str or None
        ``"non_image: <kind>"`` (kind e.g. ``SR``, ``KO``, ``PR``, ``SEG``,
        ``RT``, ``waveform``, ``encapsulated document``, ``raw data``,
        ``DICOMDIR``, or the header Modality) for objects the pipeline skips;
        ``None`` for image storage classes and for anything not known to be
        without an image.
    """
    uid = (header.sop_class_uid or "").strip()
    if uid == MEDIA_STORAGE_DIRECTORY:
        return "non_image: DICOMDIR"
    name = _sop_class_name(uid) if uid else None
    if name is not None:
        # Pad so " SR " also matches a name ending in "SR Storage" or "SR Storage - Trial".
        padded = f" {name} "
        if "Image" in name:  # RT Image, Enhanced RT Image, every *Image Storage class
            return None
        for needle, kind in _NON_IMAGE_NAMES:
            if needle in padded:
                return f"non_image: {kind}"
        return None
    # A private or missing SOP class: the Modality tag is all there is.
    if is_non_image_modality(header.modality):
        return f"non_image: {normalise_modality(header.modality)}"
    return None
