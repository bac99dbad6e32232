"""JPEG 2000 and JPEG decoders side by side, full resolution against reduced (one core).

Run: .venv/bin/python tests/bench/bench_decoders.py [--repeat 5] [--out bench-decoders.json]

For each file, one frame is decoded by every candidate that is installed, ``--repeat`` times
(the median counts), in milliseconds:

* JPEG 2000: pydicom with pylibjpeg-openjpeg and with GDCM (the plugins the full decode uses),
  imagecodecs' ``jpeg2k_decode`` (OpenJPEG, full resolution only: it has no reduce parameter),
  Pillow's OpenJPEG plugin in full, at the level sorter.dicom.reduced picks (``OVERSAMPLE`` x 128)
  and at the level one octave further (the long side just >= 128);
* JPEG baseline: pydicom with pylibjpeg-libjpeg and with GDCM, imagecodecs' ``jpeg8_decode`` in
  full and with its ``shape`` argument (it did not scale here), Pillow in full and with ``draft``;
* both: ``load_image`` end to end (read, decode, Modality LUT, grey), full and reduced.

Files: pydicom-data's RG1_J2KR, RG3_J2KR, MR2_J2KR, US1_J2KR, color3d_jpeg_baseline, and from
../shared/corpus (when present) NEMA CT1, RG2 and MG1 and the RSNA chest radiograph (JPEG).
Prints a table and writes JSON. Timings belong here, never in tests.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import get_frame
from pydicom.pixels import get_decoder

from sorter.dicom import reduced
from sorter.dicom.pixels import load_image

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus"
FILES = [
    "pydicom:RG1_J2KR.dcm",
    "pydicom:RG3_J2KR.dcm",
    "pydicom:MR2_J2KR.dcm",
    "pydicom:US1_J2KR.dcm",
    "pydicom:color3d_jpeg_baseline.dcm",
    "corpus:CT/nema_wg04_ct1/CT1_J2KR.dcm",
    "corpus:XR/nema_wg04_rg2/RG2_J2KR.dcm",
    "corpus:MG/nema_wg04_mg1/MG1_J2KI.dcm",
    "corpus:XR/rsna_pneumonia_cxr/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
]
SIDE = 128


def _path(entry: str) -> Path | None:
    kind, name = entry.split(":", 1)
    path = Path(get_testdata_file(name) or "") if kind == "pydicom" else CORPUS / name
    return path if path.is_file() else None


def _ms(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # first call: imports and plugin set-up
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1e3, 2)


def _pillow_j2k(data: bytes, level: int) -> Callable[[], Any]:
    def run() -> Any:
        image = Image.open(io.BytesIO(data), formats=["JPEG2000"])
        image.reduce = level  # type: ignore[method-assign,assignment]
        image.load()
        return image

    return run


def _pillow_jpeg(data: bytes, scale: int) -> Callable[[], Any]:
    def run() -> Any:
        image = Image.open(io.BytesIO(data), formats=["JPEG"])
        if scale > 1:
            image.draft(image.mode, (image.size[0] // scale, image.size[1] // scale))
        image.load()
        return image

    return run


def candidates(ds: pydicom.Dataset, path: Path) -> dict[str, Callable[[], Any]]:
    """The decoders that apply to this file's transfer syntax and are installed."""
    tsyntax = ds.file_meta.TransferSyntaxUID
    decoder = get_decoder(tsyntax)
    frames = int(ds.get("NumberOfFrames") or 1)
    data = get_frame(ds.PixelData, frames // 2, number_of_frames=frames)
    side = max(int(ds.Rows), int(ds.Columns))
    out: dict[str, Callable[[], Any]] = {}
    for plugin in ("pylibjpeg", "gdcm"):
        if plugin in decoder.available_plugins:
            out[f"pydicom+{plugin}, full"] = lambda p=plugin: decoder.as_array(
                ds, index=frames // 2, decoding_plugin=p
            )
    try:
        import imagecodecs
    except ImportError:
        imagecodecs = None
    if tsyntax in reduced.J2K_SYNTAXES:
        if imagecodecs is not None:
            out["imagecodecs jpeg2k, full"] = lambda: imagecodecs.jpeg2k_decode(data)
        info = reduced.parse_codestream(data)
        shipped = reduced.reduction(side, reduced.OVERSAMPLE * SIDE, info.levels)
        fastest = reduced.reduction(side, SIDE, info.levels)
        out["Pillow OpenJPEG, full"] = _pillow_j2k(data, 0)
        if shipped:
            shipped = reduced.open_j2k(data, shipped)[1]  # the level Pillow reads, as decode_reduced does
        out[f"Pillow OpenJPEG, reduce {shipped} (shipped)"] = _pillow_j2k(data, shipped)
        if fastest != shipped:
            out[f"Pillow OpenJPEG, reduce {fastest} (oversample 1)"] = _pillow_j2k(data, fastest)
    else:
        scale = next((s for s in (8, 4, 2) if -(-side // s) >= reduced.OVERSAMPLE * SIDE), 1)
        if imagecodecs is not None:
            out["imagecodecs jpeg8, full"] = lambda: imagecodecs.jpeg8_decode(data)
            if scale > 1:
                shape = (-(-int(ds.Rows) // scale), -(-int(ds.Columns) // scale))
                out[f"imagecodecs jpeg8, 1/{scale}"] = lambda: imagecodecs.jpeg8_decode(data, shape=shape)
        out["Pillow libjpeg-turbo, full"] = _pillow_jpeg(data, 1)
        out[f"Pillow libjpeg-turbo, draft 1/{scale} (shipped)"] = _pillow_jpeg(data, scale)
    out["load_image, full"] = lambda: load_image(path)
    out["load_image, reduced (shipped)"] = lambda: load_image(path, min_side=SIDE)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench-decoders.json"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    for entry in FILES:
        path = _path(entry)
        if path is None:
            print(f"{entry}: not found, skipped")
            continue
        ds = pydicom.dcmread(path)
        label = f"{path.name[:24]} {ds.Columns}x{ds.Rows} {ds.get('BitsStored')}-bit"
        for name, fn in candidates(ds, path).items():
            try:
                result = fn()
                ms = _ms(fn, args.repeat)
            except Exception as exc:  # a decoder that cannot read this file: recorded, not fatal
                error = f"{type(exc).__name__}: {exc}"[:120]
                rows.append({"file": path.name, "decoder": name, "error": error})
                print(f"{label:<44} {name:<44} error: {type(exc).__name__}")
                continue
            if hasattr(result, "frames"):  # a DecodedImage
                shape = result.frames.shape[1:]
            elif isinstance(result, Image.Image):
                shape = result.size[::-1]
            else:  # an array, or pydicom's (array, properties)
                shape = np.asarray(result[0] if isinstance(result, tuple) else result).shape
            rows.append({"file": path.name, "size": f"{ds.Columns}x{ds.Rows}", "decoder": name, "ms": ms})
            print(f"{label:<44} {name:<44} {ms:>9.2f} ms  -> {tuple(shape)[:2]}")
    versions = {}
    packages = ("pillow", "pydicom", "pylibjpeg-openjpeg", "pylibjpeg-libjpeg", "python-gdcm", "imagecodecs")
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    result = {"machine": f"{platform.machine()}, one core", "versions": versions, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
