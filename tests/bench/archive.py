"""Benchmark archives built from real DICOM files, every copy under new UIDs.

A template is a real file (from ``../shared/corpus`` or pydicom's test files)
re-saved once with placeholder UIDs of a fixed length; each copy patches new
UIDs of the same length into those bytes, so building 20 000 files costs a
byte replace and a write per file, and nothing in the archive deduplicates
(every SOP, series and study UID is new). Pixel data is never touched:
compressed files stay compressed in their own transfer syntax.

Kinds:

* ``ct512``: 512 x 512 CT slices stored uncompressed (the common case for CT
  in a hospital archive), from four corpus sources.
* ``mixed``: half of ``ct512``, plus compressed CT (JPEG 2000, JPEG lossless),
  radiographs up to 2 140 x 1 760 (JPEG 2000, JPEG baseline, uncompressed),
  and pydicom's small MR and CT files.
* ``small``: pydicom's MR_small and CT_small only (tests/bench/bench_scan.py).
"""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus"
UID_ROOT = "1.2.826.0.1.3680043.9.7433."  # example root; every placeholder has the same length
DIGITS = 12
SERIES_FILES = 100  # files per series; each series copies one template

CT512 = [
    "CT/tcia_lidc_idri_0314",
    "CT/tcia_nsclc_lung1_001",
    "CT/dcmqi_ct_3slice",
    "CT/barre_ct_brain",
]
COMPRESSED_CT = ["CT/totalseg_example_ct", "CT/nema_wg04_ct1", "CT/pydicomdata_siemens_spine"]
RADIOGRAPHS = [
    "XR/nema_wg04_rg1",
    "XR/nema_wg04_rg2",
    "XR/rsna_pneumonia_cxr",
    "XR/barre_cr_chest",
    "XR/nema_wg04_xa1",
]
PYDICOM_FILES = ["MR_small.dcm", "CT_small.dcm"]


def uid(kind: int, n: int) -> str:
    """A UID of fixed length: ``kind`` 1 SOP, 2 series, 3 study; ``n`` 0 is the placeholder."""
    return f"{UID_ROOT}{kind}.1{n:0{DIGITS - 1}d}"


@dataclass(frozen=True)
class Template:
    """A real file re-saved with placeholder UIDs."""

    name: str
    data: bytes
    rows: int
    columns: int
    transfer_syntax: str


def make_template(path: Path) -> Template:
    """Re-save ``path`` with placeholder UIDs whose bytes can be patched in place."""
    with warnings.catch_warnings():  # some corpus files carry non-conformant UIDs; they are replaced
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid(1, 0)
    ds.SeriesInstanceUID, ds.StudyInstanceUID = uid(2, 0), uid(3, 0)
    with tempfile.NamedTemporaryFile(suffix=".dcm") as handle:
        ds.save_as(handle.name, enforce_file_format=False)
        data = Path(handle.name).read_bytes()
    return Template(
        f"{path.parent.name}/{path.name}",
        data,
        int(ds.Rows),
        int(ds.Columns),
        ds.file_meta.TransferSyntaxUID.name,
    )


def _corpus_files(folders: list[str], per_folder: int) -> list[Path]:
    files: list[Path] = []
    for folder in folders:
        found = sorted((CORPUS / folder).glob("*.dcm"))
        files += found[:: max(1, len(found) // per_folder)][:per_folder]
    return files


def templates(kind: str) -> list[Template]:
    """The templates of an archive kind; raises SystemExit with a message without the corpus."""
    if kind not in ("ct512", "mixed", "small"):
        raise ValueError(f"unknown archive kind {kind!r}")
    if kind == "small":  # pydicom's 64 x 64 MR and 128 x 128 CT: header-bound, no corpus needed
        return [make_template(Path(get_testdata_file(name))) for name in PYDICOM_FILES]
    if not (CORPUS / "manifest.csv").is_file():
        raise SystemExit(f"the benchmark archive needs the corpus at {CORPUS}")
    ct = [make_template(p) for p in _corpus_files(CT512, 4)]
    if kind == "ct512":
        return ct
    others = [make_template(p) for p in _corpus_files(COMPRESSED_CT + RADIOGRAPHS, 1)]
    others += [make_template(Path(get_testdata_file(name))) for name in PYDICOM_FILES]
    # Alternate series: half CT 512 uncompressed, half everything else.
    return [t for i in range(max(len(ct), len(others))) for t in (ct[i % len(ct)], others[i % len(others)])]


def build(root: Path, files: int, kind: str = "ct512") -> dict[str, object]:
    """Write ``files`` copies under ``root``/study/series/; returns what was built and how long it took."""
    started = time.perf_counter()
    pool = templates(kind)
    marks = {key: uid(k, 0).encode() for key, k in (("sop", 1), ("series", 2), ("study", 3))}
    used: dict[str, int] = {}
    for i in range(files):
        series, study = i // SERIES_FILES, i // (10 * SERIES_FILES)
        template = pool[series % len(pool)]
        data = template.data
        for key, value in (
            ("sop", uid(1, i + 1)),
            ("series", uid(2, series + 1)),
            ("study", uid(3, study + 1)),
        ):
            data = data.replace(marks[key], value.encode())
        folder = root / f"study{study:05d}" / f"series{series:06d}"
        if i % SERIES_FILES == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:08d}.dcm").write_bytes(data)
        used[template.name] = used.get(template.name, 0) + 1
    sizes = sorted({(t.rows, t.columns, t.transfer_syntax) for t in pool})
    return {
        "kind": kind,
        "files": files,
        "seconds": round(time.perf_counter() - started, 1),
        "templates": used,
        "images": [f"{r}x{c} {ts}" for r, c, ts in sizes],
    }


def archive_files(root: Path) -> list[Path]:
    """The archive's files in a stable order."""
    return sorted(root.rglob("*.dcm"))
