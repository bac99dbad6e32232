"""A small archive for the review tests: real CT and MR slices, one series with a wrong header.

Copies of corpus files get new UIDs; the series ``ct_labelled_mr`` holds CT slices whose header
says MR, in a study with an honest MR series. Scanned with the bundled model, that series is the
one discrepancy (tests/test_reports_discrepancy.py checks the model finds it).
"""

from __future__ import annotations

from pathlib import Path

from db_support import copy_dicom
from pydicom.uid import generate_uid

PER_SERIES = 4
#: name -> (corpus folder, header Modality written on the copies, study)
SERIES = {
    "ct_labelled_mr": ("CT/tcia_lidc_idri_0314", "MR", "study_x"),
    "mr_honest": ("MR/dwv_bbmri_memprage", "MR", "study_x"),
    "ct_honest": ("CT/tcia_nsclc_lung1_001", "CT", "study_y"),
}


def make_archive(
    corpus: Path,
    root: Path,
    series: dict[str, tuple[str, str, str]] = SERIES,
    per_series: int = PER_SERIES,
) -> dict[str, str]:
    """Write ``series`` (name -> corpus folder, header Modality, study) under ``root``, ``per_series``
    files each under new UIDs; return series (and study) name -> UID."""
    studies = {study: generate_uid() for _, _, study in series.values()}
    uids: dict[str, str] = dict(studies)
    for name, (folder, modality, study) in series.items():
        uids[name] = generate_uid()
        sources = sorted((corpus / folder).glob("*.dcm"))[:per_series]
        assert len(sources) == per_series, f"corpus folder {folder} changed"
        for source in sources:
            copy_dicom(
                source, root / name / source.name, series=uids[name], study=studies[study], modality=modality
            )
    return uids
