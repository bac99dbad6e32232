"""The radionuclide as a witness: which scanner can image what the header says was injected.

A PET scanner images positron emitters (F-18, Ga-68, Rb-82 ...); a gamma camera images
single-photon emitters (Tc-99m, I-123, Lu-177 ...). The Radiopharmaceutical Information Sequence
(0054,0016) names the nuclide in its Radionuclide Code Sequence (0054,0300), so a PT header whose
nuclide is Lu-177, or an NM header whose nuclide is F-18, contradicts itself: a SPECT exported
as PT for dosimetry software, a PET processed on a nuclear medicine workstation and saved as NM.
The pixels alone seldom tell SPECT from PET slices; the nuclide does (see
:func:`sorter.compare.compare`), both ways: a PT header naming F-18, or an NM header naming
Tc-99m, is confirmed by it wherever the pixels show emission imaging at all.

The code lists are DICOM's own, as pydicom ships them: CID 4020 "PET Radionuclide" and CID 18
"Isotopes in Radiopharmaceuticals", by SNOMED CT code, with the retired SNOMED RT codes (C-111A1
...) that most archives still hold mapped through pydicom's SNOMED table.
"""

from __future__ import annotations

from functools import cache

from sorter.domain import Label

#: Emission imaging: the labels whose pixels (SPECT and PET slices above all) seldom tell them
#: apart, and the only ones a radionuclide judges (a PET/CT's CT often names the PET's).
EMISSION: frozenset[Label] = frozenset({Label.PT, Label.NM})
#: CID 4020 (PET Radionuclide) and CID 18 (Isotopes in Radiopharmaceuticals), PS3.16.
_PET_CID, _ISOTOPE_CID = 4020, 18
#: Nuclides imaged both ways in practice: Y-90 microspheres by PET and by bremsstrahlung SPECT.
#: (F-18, Cu-64 and Na-22, in both CIDs, are PET's: gamma-camera coincidence imaging is gone.)
_EITHER: frozenset[str] = frozenset({"_90Yttrium"})


@cache
def _codes() -> dict[str, frozenset[Label]]:
    """Code value (SNOMED CT, SNOMED RT, DCM, NCIt) -> the label of the scanner that images it."""
    from pydicom.sr import _cid_dict, _snomed_dict
    from pydicom.sr.codedict import codes

    def keywords(cid: int) -> dict[str, str]:
        return {k: scheme for scheme, names in _cid_dict.cid_concepts[cid].items() for k in names}

    pet, isotopes = keywords(_PET_CID), keywords(_ISOTOPE_CID)
    out: dict[str, frozenset[Label]] = {}
    for keyword, scheme in {**isotopes, **pet}.items():
        if keyword in _EITHER:
            continue
        labels = frozenset({Label.PT}) if keyword in pet else frozenset({Label.NM})
        value = getattr(getattr(codes, scheme), keyword).value
        out[value] = labels
    retired = {sct: srt for srt, sct in _snomed_dict.mapping["SRT"].items()}
    for value, labels in list(out.items()):
        if value in retired:
            out[retired[value]] = labels
    return out


def nuclide_labels(code_value: object) -> frozenset[Label] | None:
    """The labels a nuclide's code allows the image (``{PT}`` or ``{NM}``); ``None``: no claim."""
    if not code_value:
        return None
    return _codes().get(str(code_value).strip().rstrip("\0"))


def nuclide_contradiction(label: Label | None, code_value: object) -> frozenset[Label] | None:
    """What the nuclide allows when the header's label is PT or NM and the nuclide rules it out.

    ``None`` for any other label: a PET/CT's CT often carries the PET's radiopharmaceutical.
    """
    if label not in EMISSION:
        return None
    allowed = nuclide_labels(code_value)
    return allowed if allowed is not None and label not in allowed else None


def nuclide_confirms(label: Label | None, code_value: object) -> bool:
    """Whether the header's label is PT or NM and its nuclide is one only that scanner images."""
    if label not in EMISSION:
        return False
    return nuclide_labels(code_value) == frozenset({Label(label)})  # a stored label is its text
