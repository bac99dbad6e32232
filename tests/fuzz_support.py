"""Seeded, reproducible fuzzing of pydicom's compressed test files (bit flips and truncations).

Every mutant gets UIDs of its own (derived from its name, so that two runs
write the same bytes), then has bits flipped or its tail cut off, mostly in
the pixel data, where the codecs (pylibjpeg's Rust and C decoders, GDCM)
meet it. Used by the fuzz tests (scan, watch, the Celery task) and by the
reliability benchmark.
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

#: pydicom's test files in every compressed transfer syntax it ships (RLE, JPEG baseline,
#: extended and lossless, JPEG-LS, JPEG 2000, deflate), single- and multi-frame, grey and colour.
SOURCES = (
    "MR_small_RLE.dcm",
    "emri_small_RLE.dcm",
    "SC_rgb_rle.dcm",
    "SC_rgb_rle_2frame.dcm",
    "rtdose_rle.dcm",
    "JPEG2000.dcm",
    "MR_small_jp2klossless.dcm",
    "emri_small_jpeg_2k_lossless.dcm",
    "US1_J2KR.dcm",
    "JPEG-lossy.dcm",
    "JPEG-LL.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_jpeg_no_color_transform.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEGLSNearLossless_16.dcm",
    "image_dfl.dcm",
)

_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian


@dataclass(frozen=True)
class Mutant:
    """One fuzzed file: where it is, what it came from and what was done to it."""

    path: Path
    source: str
    mutation: str


def _uid(*parts: object) -> str:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def renamed(source: str, name: str) -> bytes:
    """``source`` (a pydicom test file) with study, series and SOP Instance UIDs derived from ``name``."""
    ds = pydicom.dcmread(get_testdata_file(source))
    ds.StudyInstanceUID = _uid(name, "study")
    ds.SeriesInstanceUID = _uid(name, "series")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(name, "sop")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _pixel_offset(data: bytes) -> int:
    """Where the pixel data starts; the second half of a deflated file (no tag to find there)."""
    at = data.rfind(_PIXEL_DATA_TAG)
    return at + 12 if at > 0 else len(data) // 2  # tag, VR, reserved and length


def mutate(data: bytes, rng: random.Random, kind: str) -> bytes:
    """Flip 1 to 16 bits in the pixel data (``flip``) or anywhere after the preamble (``flip-any``),
    or cut the file short inside its pixel data (``cut``)."""
    start = 132 if kind == "flip-any" else _pixel_offset(data)
    if kind == "cut":
        return data[: rng.randrange(start, len(data))]
    out = bytearray(data)
    for _ in range(rng.choice((1, 4, 16))):
        out[rng.randrange(start, len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def fuzz_archive(
    dest: Path, seed: int = 0, per_source: int = 6, sources: tuple[str, ...] = SOURCES
) -> list[Mutant]:
    """Write ``per_source`` mutants of each source file under ``dest``; the same seed, the same bytes."""
    kinds = ("flip", "flip", "flip", "cut", "flip-any", "flip")
    mutants: list[Mutant] = []
    for source in sources:
        for i in range(per_source):
            kind = kinds[i % len(kinds)]
            name = f"{Path(source).stem}-{seed}-{i}-{kind}"
            rng = random.Random(f"{seed}/{source}/{i}")
            path = dest / Path(source).stem / f"{name}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(mutate(renamed(source, name), rng, kind))
            mutants.append(Mutant(path, source, kind))
    return mutants


def panicking_rle(dest: Path, tries: int = 200) -> Path | None:
    """A bit-flipped ``MR_small_RLE.dcm`` that makes pylibjpeg-rle's Rust decoder panic, or ``None``.

    The panic (``pyo3_runtime.PanicException``) derives from ``BaseException``.
    The file is otherwise sound (the project's reader reads it whole), so that
    the panic is what a scan meets. Found by trying seeds in order: the same
    library gives the same file.
    """
    from rle import pixel_array  # pylibjpeg-rle, called directly: no fallback to another plugin

    from sorter.dicom.reading import read_dataset

    dest.parent.mkdir(parents=True, exist_ok=True)
    for seed in range(tries):
        rng = random.Random(f"panic/{seed}")
        dest.write_bytes(mutate(renamed("MR_small_RLE.dcm", f"panic-{seed}"), rng, "flip"))
        try:
            pixel_array(read_dataset(str(dest)))
        except Exception:
            continue
        except BaseException as exc:
            if type(exc).__name__ == "PanicException":
                return dest
            raise
    dest.unlink()
    return None
