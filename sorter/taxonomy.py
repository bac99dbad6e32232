"""Header Modality (0008,0060) to visual label: the one place that knows the mapping.

See ARCHITECTURE §3. Header text becomes a :class:`~sorter.domain.Label` here,
once, and nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence

from sorter.domain import InstanceHeader, Label

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


#: Secondary Capture SOP classes (PS3.4 B.5 and the multi-frame ones). Such an object often
#: carries its study's Modality (CT, MR ...) while its pixels are a page of text (a CT dose
#: report, a protocol page), a 3D rendering or a processing screen: under a tomographic or nuclear
#: label the Modality is no claim about what the pixels look like, and every CT study's dose page
#: was a false discrepancy. (Under XR, MG and US a capture is mostly a digitised film or a
#: scanner's screen of that modality, and keeps its claim.)
SECONDARY_CAPTURE_CLASSES: frozenset[str] = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.7.1",
        "1.2.840.10008.5.1.4.1.1.7.2",
        "1.2.840.10008.5.1.4.1.1.7.3",
        "1.2.840.10008.5.1.4.1.1.7.4",
    }
)
#: What a standard image storage SOP class (PS3.4 B.5) says its pixels are: the IOD fixes the
#: acquisition, so a CT Image Storage object whose Modality says MR contradicts itself. Both tags
#: are written by the device, but routers, anonymisers and hand edits rewrite the Modality and
#: leave the class (see :func:`class_contradiction`). Projection classes allow XR and MG: CR and
#: DX objects hold mammograms in the wild. Secondary capture, 3D X-ray and private classes claim
#: nothing.
_IMAGE_CLASSES: tuple[tuple[frozenset[Label], tuple[str, ...]], ...] = (
    (frozenset({Label.CT}), ("2", "2.1", "2.2")),  # CT, Enhanced CT, Legacy Converted Enhanced CT
    (frozenset({Label.MR}), ("4", "4.1", "4.3", "4.4")),  # MR, Enhanced MR (and colour), Legacy
    (frozenset({Label.PT}), ("128", "128.1", "130")),  # PET, Legacy Converted Enhanced, Enhanced
    (frozenset({Label.NM}), ("20", "5")),  # NM, and its retired class
    (frozenset({Label.US}), ("6.1", "6.2", "3.1", "6", "3")),  # US, Enhanced US Volume, multi-frame
    (frozenset({Label.MG}), ("1.2", "1.2.1", "13.1.3", "13.1.4", "13.1.5")),  # mammography, tomo
    (frozenset({Label.XR, Label.MG}), ("1", "1.1", "1.1.1")),  # CR, DX
    (frozenset({Label.XR}), ("1.3", "1.3.1", "12.1", "12.1.1", "12.2", "12.2.1", "481.1")),  # IO, XA, RF, RT
    # VL endoscopic, microscopic, slide-coordinates, photographic (and video), ophthalmic, whole slide
    (frozenset({Label.OT}), ("77.1.1", "77.1.1.1", "77.1.2", "77.1.2.1", "77.1.3", "77.1.4", "77.1.4.1")),
    (frozenset({Label.OT}), ("77.1.5.1", "77.1.5.2", "77.1.6")),
)
_CLASS_LABELS: dict[str, frozenset[Label]] = {
    f"1.2.840.10008.5.1.4.1.1.{suffix}": labels for labels, suffixes in _IMAGE_CLASSES for suffix in suffixes
}
#: Modalities whose localizer (Image Type LOCALIZER) is a projection radiograph: a CT scout,
#: topogram or surview looks like an X-ray, not like a slice. (An MR localizer is MR.)
PROJECTION_LOCALIZERS: frozenset[str] = frozenset({"CT"})
#: Labels a secondary capture's Modality makes no claim for (see SECONDARY_CAPTURE_CLASSES).
_CAPTURE_WITHOUT_CLAIM: frozenset[Label] = frozenset({Label.CT, Label.MR, Label.PT, Label.NM})


def expected_label(
    modality: object, *, localizer: bool = False, sop_class_uid: str | None = None
) -> Label | None:
    """What the header says the pixels look like: :func:`header_label`, except that a CT
    localizer looks like XR, and a secondary capture under CT, MR, PT or NM makes no claim
    (``None``: the verdict is ``no_header``)."""
    label = header_label(modality)
    if label is None:
        return None
    if sop_class_uid in SECONDARY_CAPTURE_CLASSES and label in _CAPTURE_WITHOUT_CLAIM:
        return None
    if localizer and normalise_modality(modality) in PROJECTION_LOCALIZERS:
        return Label.XR
    return label


def label_of(header: InstanceHeader) -> Label | None:
    """:func:`expected_label` of a header read from a file."""
    return expected_label(header.modality, localizer=header.localizer, sop_class_uid=header.sop_class_uid)


def class_labels(sop_class_uid: object) -> frozenset[Label] | None:
    """The labels a standard image SOP class allows its pixels (``None``: it claims nothing)."""
    return _CLASS_LABELS.get(str(sop_class_uid).strip().rstrip("\0")) if sop_class_uid else None


def class_contradiction(modality: object, sop_class_uid: object) -> frozenset[Label] | None:
    """The labels the SOP class allows when they exclude the Modality's label, else ``None``.

    A CT Image Storage object whose Modality is MR gives ``{CT}``: two tags of one header say
    different things, and :func:`sorter.compare.compare` then lets the pixels decide between
    them. The Modality's own label counts, not :func:`expected_label`'s (a CT localizer is a CT
    object that looks like XR, no contradiction).
    """
    allowed = class_labels(sop_class_uid)
    label = header_label(modality)
    if allowed is None or label is None or label in allowed:
        return None
    return allowed


def is_localizer(image_type: object) -> bool:
    """True when an Image Type (0008,0008) value names LOCALIZER (in any of its values)."""
    if image_type is None:
        return False
    if isinstance(image_type, Sequence) and not isinstance(image_type, str | bytes):
        values: Sequence[object] = image_type  # pydicom's MultiValue
    else:
        values = str(image_type).split("\\")
    return any(str(value).strip().upper() == "LOCALIZER" for value in values)


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
