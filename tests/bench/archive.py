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
* ``archive``: shaped like a PACS by instance count (series of 10): 55 % CT and MR slices,
  uncompressed or JPEG lossless; 15 % radiographs in JPEG 2000 (NEMA RG1-RG3 and XA1, and a
  1 024 x 1 024 chest radiograph re-encoded as JPEG 2000 lossless); 5 % full-size mammograms in
  JPEG 2000 (NEMA MG1, 4 664 x 3 064); 10 % multi-frame ultrasound in JPEG baseline; 15 % NM, PT
  and secondary captures. Build it in multiples of 400 files for exactly that mix.
* ``ct512j2k``: 512 x 512 CT stored as JPEG 2000 lossless (the corpus's NEMA CT1).
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
KINDS = ("ct512", "mixed", "small", "archive", "ct512j2k")
SERIES_FILES_BY_KIND = {"archive": 10}  # many short series, so that 1 200 files hold the whole mix

#: The ``archive`` mix: 40 series slots (2.5 % of the instances each), by category. An entry is a
#: corpus folder (``n`` files from it), ``pydicom:NAME`` (pydicom's test data) or ``j2k:PATH``
#: (a corpus file re-encoded as JPEG 2000 lossless once, when the template is made).
ARCHIVE_MIX: dict[str, list[tuple[str, int]]] = {
    "ct_mr": [  # 22 slots: 55 %
        ("CT/tcia_lidc_idri_0314", 3),
        ("CT/tcia_nsclc_lung1_001", 3),
        ("CT/barre_ct_brain", 2),
        ("CT/dcmqi_ct_3slice", 2),
        ("MR/dwv_bbmri_memprage", 6),
        ("CT/pydicomdata_siemens_spine", 3),  # JPEG lossless
        ("MR/weasis_philips_mr_abdomen", 3),  # JPEG lossless
    ],
    "radiograph_j2k": [  # 6 slots: 15 %
        ("XR/nema_wg04_rg1", 1),  # 15-bit: Pillow cannot read it, decoded in full
        ("XR/nema_wg04_rg2", 2),
        ("XR/nema_wg04_rg3", 1),
        ("XR/nema_wg04_xa1", 1),
        ("j2k:XR/rsna_pneumonia_cxr", 1),
    ],
    "mammogram_j2k": [("MG/nema_wg04_mg1", 2)],  # 2 slots: 5 %
    "us_multiframe_jpeg": [("US/dicomparser_acuson_doppler", 2), ("pydicom:color3d_jpeg_baseline.dcm", 2)],
    "nm_pt_sc": [  # 6 slots: 15 %
        ("NM/kanoun_scintigraphy", 1),
        ("NM/nema_wg04_nm1", 1),
        ("PT/tcia_qin_headneck_0024", 2),
        ("OT/leadtools_flowers", 1),  # JPEG baseline
        ("OT/nema_wg04_vl1", 1),  # JPEG 2000 colour
    ],
}


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


def make_template(path: Path, j2k: bool = False) -> Template:
    """Re-save ``path`` with placeholder UIDs whose bytes can be patched in place.

    ``j2k``: re-encode its pixels as JPEG 2000 lossless first (pydicom's pylibjpeg-openjpeg encoder).
    """
    with warnings.catch_warnings():  # some corpus files carry non-conformant UIDs; they are replaced
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        if j2k:
            from pydicom.uid import JPEG2000Lossless

            ds.compress(JPEG2000Lossless, ds.pixel_array)
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


def _mix_templates(entries: list[tuple[str, int]]) -> list[Template]:
    out: list[Template] = []
    for entry, n in entries:
        if entry.startswith("pydicom:"):
            out += [make_template(Path(get_testdata_file(entry.removeprefix("pydicom:"))))] * n
        elif entry.startswith("j2k:"):
            out += [make_template(p, j2k=True) for p in _corpus_files([entry.removeprefix("j2k:")], 1)] * n
        else:
            found = _corpus_files([entry], n)
            out += [make_template(found[i % len(found)]) for i in range(n)]
    return out


def archive_mix() -> list[Template]:
    """The ``archive`` kind's 40 slots, categories interleaved (a partial cycle is still a mix)."""
    groups = [_mix_templates(entries) for entries in ARCHIVE_MIX.values()]
    assert sum(len(g) for g in groups) == 40, [len(g) for g in groups]
    slots: list[Template] = []
    position = {id(g): 0 for g in groups}
    # Deal each category in proportion: slot k goes to the category furthest behind its share.
    for k in range(40):
        group = min(groups, key=lambda g: (position[id(g)] + 1) / len(g) - (k + 1) / 40)
        slots.append(group[position[id(group)]])
        position[id(group)] += 1
    return slots


def templates(kind: str) -> list[Template]:
    """The templates of an archive kind; raises SystemExit with a message without the corpus."""
    if kind not in KINDS:
        raise ValueError(f"unknown archive kind {kind!r}")
    if kind == "small":  # pydicom's 64 x 64 MR and 128 x 128 CT: header-bound, no corpus needed
        return [make_template(Path(get_testdata_file(name))) for name in PYDICOM_FILES]
    if not (CORPUS / "manifest.csv").is_file():
        raise SystemExit(f"the benchmark archive needs the corpus at {CORPUS}")
    if kind == "archive":
        return archive_mix()
    if kind == "ct512j2k":
        return [make_template(CORPUS / "CT/nema_wg04_ct1/CT1_J2KR.dcm")]
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
    per_series = SERIES_FILES_BY_KIND.get(kind, SERIES_FILES)
    written = 0
    for i in range(files):
        series, study = i // per_series, i // (10 * per_series)
        template = pool[series % len(pool)]
        data = template.data
        for key, value in (
            ("sop", uid(1, i + 1)),
            ("series", uid(2, series + 1)),
            ("study", uid(3, study + 1)),
        ):
            data = data.replace(marks[key], value.encode())
        folder = root / f"study{study:05d}" / f"series{series:06d}"
        if i % per_series == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:08d}.dcm").write_bytes(data)
        used[template.name] = used.get(template.name, 0) + 1
        written += len(data)
    sizes = sorted({(t.rows, t.columns, t.transfer_syntax) for t in pool})
    return {
        "kind": kind,
        "files": files,
        "seconds": round(time.perf_counter() - started, 1),
        "megabytes": round(written / 2**20, 1),
        "templates": used,
        "images": [f"{r}x{c} {ts}" for r, c, ts in sizes],
    }


def archive_files(root: Path) -> list[Path]:
    """The archive's files in a stable order."""
    return sorted(root.rglob("*.dcm"))
