"""Header Modality (0008,0060) to visual label: the one place that knows the mapping.

See ARCHITECTURE §3. Header text becomes a :class:`~sorter.domain.Label` here,
once, and nowhere else.
"""

from __future__ import annotations

from sorter.domain import Label

_HEADER_TO_LABEL: dict[str, Label] = {
    "CT": Label.CT,
    "MR": Label.MR,
    "PT": Label.PT,
    "NM": Label.NM,
    # Projection radiography in all its acquisition flavours.
    "CR": Label.XR,
    "DX": Label.XR,
    "DR": Label.XR,  # retired/non-standard but common in the wild
    "RG": Label.XR,
    "RF": Label.XR,
    "XA": Label.XR,
    "PX": Label.XR,
    "IO": Label.XR,
    "RTIMAGE": Label.XR,
    "MG": Label.MG,
    "US": Label.US,
    "IVUS": Label.US,
    # Not a radiological acquisition: photos, screenshots, documents, pathology.
    "OT": Label.OT,
    "SC": Label.OT,
    "XC": Label.OT,
    "ES": Label.OT,
    "GM": Label.OT,
    "SM": Label.OT,
    "OP": Label.OT,
    "DOC": Label.OT,
}

#: Modalities that never carry an image to classify (status ``skipped``, reason ``non_image``).
NON_IMAGE_MODALITIES: frozenset[str] = frozenset(
    {
        "SR",
        "KO",
        "PR",
        "SEG",
        "REG",
        "RTSTRUCT",
        "RTPLAN",
        "RTDOSE",
        "RTRECORD",
        "ECG",
        "EEG",
        "EMG",
        "EOG",
        "HD",
        "RESP",
        "AU",
        "PLAN",
        "FID",
        "RWV",
        "IOL",
        "LEN",
        "KER",
        "AR",
        "VA",
        "SRF",
        "OPV",
        "POS",
        "M3D",
    }
)


def normalise_modality(value: object) -> str | None:
    """Return the header Modality as upper-case text, or ``None`` when empty."""
    if value is None:
        return None
    text = str(value).strip().upper()
    return text or None


def header_label(modality: object) -> Label | None:
    """Map a header Modality value to a visual label.

    Parameters
    ----------
    modality
        The raw (0008,0060) value; ``None`` or blank for a missing tag.

    Returns
    -------
    Label or None
        ``None`` when the tag is missing, empty, or names a modality outside
        the taxonomy (the comparison then reports ``no_header``).
    """
    text = normalise_modality(modality)
    if text is None:
        return None
    return _HEADER_TO_LABEL.get(text)


def is_non_image_modality(modality: object) -> bool:
    """True for modalities whose objects carry no image (SR, RT*, KO, PR, SEG ...)."""
    text = normalise_modality(modality)
    return text is not None and text in NON_IMAGE_MODALITIES
