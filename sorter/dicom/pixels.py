"""Decode the pixels of an instance to grey float32 frames (ARCHITECTURE §4, first steps).

Pipeline per selected frame: decode (pydicom 3; pylibjpeg first, GDCM as the
fallback, then any other installed plugin) -> greyscale: Modality LUT, then
MONOCHROME1 inversion; palette: colour LUT -> RGB; RGB/YBR: -> RGB -> BT.601
grey. Only the selected frames are decoded: pydicom decodes one frame of a
native or encapsulated multi-frame object when given its index.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import as_pixel_options, get_decoder
from pydicom.pixels.decoders.base import Decoder

from sorter.dicom import gdcm_frame, lean, reduced
from sorter.dicom.colour import RGB_LIKE, palette_to_rgb, to_rgb255
from sorter.dicom.headers import header_from_dataset
from sorter.dicom.lut import invert_monochrome1, modality_lut
from sorter.dicom.nonimage import non_image_reason
from sorter.dicom.reading import PIXEL_TAGS, read_dataset, transfer_syntax_of
from sorter.errors import (
    INTERRUPTS,
    BlankImage,
    DecodeError,
    InputError,
    NonImageObject,
    NoPixelData,
    TruncatedFile,
    UnsupportedTransferSyntax,
    describe,
)
from sorter.imageops import blank_frames, colourfulness, finite_float32, rgb_to_grey, stack_frames

logger = logging.getLogger(__name__)

#: Plugins to try, in order; any other installed plugin comes after these.
_PREFERRED_PLUGINS = ("pylibjpeg", "gdcm")


@dataclass(frozen=True)
class DecodedImage:
    """Selected frames of one instance, as grey float32.

    Attributes
    ----------
    frames : numpy.ndarray
        ``(k, H, W)`` float32, finite: modality units for greyscale data,
        a 0-255 scale for colour data.
    colourfulness : float
        Mean colourfulness of the selected frames in [0, 1]
        (:func:`sorter.imageops.colourfulness`); 0.0 for greyscale data.
    n_frames_total : int
        Number of frames in the instance.
    photometric : str
        The data set's Photometric Interpretation (MONOCHROME2 when missing).
    stored_shape : tuple of int or None
        ``(Rows, Columns)`` of the stored image when the frames were decoded at a reduced
        resolution (:mod:`sorter.dicom.reduced`); ``None`` when ``frames`` are full size.
    grid_step : int
        ``2**r`` when ``frames`` are JPEG 2000 low-pass bands ``r`` levels down, whose sample
        ``k`` is stored pixel ``2**r * k`` (:func:`sorter.model.preprocess.cosited_box`);
        1 for full-size frames and for DCT scaling, whose samples are block means.
    """

    frames: np.ndarray
    colourfulness: float
    n_frames_total: int
    photometric: str
    stored_shape: tuple[int, int] | None = None
    grid_step: int = 1

    @classmethod
    def from_array(cls, array: np.ndarray) -> DecodedImage:
        """An image decoded by the caller, for :meth:`sorter.model.classifier.Classifier.predict_images`.

        Parameters
        ----------
        array : numpy.ndarray
            ``(H, W)`` grey or ``(k, H, W)`` frames, in modality units (rescale slope and
            intercept applied: Hounsfield units for CT), or ``(H, W, 3)`` RGB on a 0-255 scale.
            NaN and infinities become 0, as in a decoded file.

        Raises
        ------
        ValueError
            Any other shape, an empty image, or values that are not numbers.
        """
        arr = np.asarray(array)
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"an image must hold numbers, not {arr.dtype}")
        if arr.ndim == 3 and arr.shape[-1] == 3:
            rgb = finite_float32(arr)
            return cls(rgb_to_grey(rgb)[np.newaxis], colourfulness(rgb), 1, "RGB")
        given = arr.shape
        if arr.ndim == 2:
            arr = arr[np.newaxis]
        if arr.ndim != 3 or 0 in arr.shape:
            raise ValueError(f"an image is (H, W), (frames, H, W) or (H, W, 3) RGB, not {given}")
        return cls(finite_float32(arr), 0.0, int(arr.shape[0]), "MONOCHROME2")

    def without_blank_frames(self, path: str) -> DecodedImage:
        """This image without its blank frames (one value in every pixel: :func:`blank_frames`).

        Raises
        ------
        BlankImage
            Every frame read is blank: the instance is ``skipped``, never classified.
        """
        blank = blank_frames(self.frames)
        if not blank.any():
            return self
        if blank.all():
            if len(blank) == 1:
                which = f"the frame read holds one value ({float(self.frames.flat[0]):g})"
            else:
                which = f"each of the {len(blank)} frames read holds one value"
            raise BlankImage(path, f"{which} in every pixel: nothing shows what made it")
        return replace(self, frames=self.frames[~blank])

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, columns)`` of the stored image, whatever resolution ``frames`` were decoded at."""
        if self.stored_shape is not None:
            return self.stored_shape
        return int(self.frames.shape[1]), int(self.frames.shape[2])


def select_frames(n_total: int, k: int) -> list[int]:
    """Indices of `k` evenly spaced frames: the centres of `k` equal bins.

    ``k = 1`` gives the middle frame ``n_total // 2``; ``k >= n_total`` gives all frames.
    """
    k = max(1, min(k, n_total))
    return [(2 * i + 1) * n_total // (2 * k) for i in range(k)]


def load_image(path: str | os.PathLike[str], frames: int = 1, min_side: int | None = None) -> DecodedImage:
    """Read a DICOM file and decode `frames` evenly spaced frames to grey float32.

    Uncompressed little-endian greyscale files take :mod:`sorter.dicom.lean`,
    everything else pydicom; both give the same values.

    Parameters
    ----------
    path : str or os.PathLike
        The file; ACR-NEMA files without preamble or File Meta Information are accepted.
    frames : int
        How many frames to return: 1 (the middle frame) or more (evenly spaced).
    min_side : int or None
        The long side the caller needs at least (the model's input size): JPEG 2000 and 8-bit
        JPEG frames are decoded at the coarsest resolution that keeps it
        (:mod:`sorter.dicom.reduced`). ``None``: every frame in full.

    Returns
    -------
    DecodedImage

    Raises
    ------
    UnreadableFile, NotDicom, TruncatedFile
        From reading the file (:func:`sorter.dicom.reading.read_dataset`).
    NoPixelData, NonImageObject, UnsupportedTransferSyntax, DecodeError
        From decoding (:func:`decode_dataset`).
    """
    name = os.fspath(path)
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    common = lean.load_frames(name, lambda n_total: select_frames(n_total, frames))
    if common is not None:
        return DecodedImage(common.frames, 0.0, common.n_frames_total, common.photometric)
    return decode_dataset(read_dataset(name), name, frames, min_side)


def decode_dataset(ds: Dataset, path: str, frames: int = 1, min_side: int | None = None) -> DecodedImage:
    """Decode `frames` evenly spaced frames of an already-read data set to grey float32.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The full data set, pixel data included (from a file or a C-STORE request).
        It is not modified.
    path : str
        Reported in errors.
    frames : int
        How many frames to return: 1 (the middle frame) or more (evenly spaced).
    min_side : int or None
        Decode compressed frames at a reduced resolution whose long side is at least this
        (see :func:`load_image`); ``None``: in full.

    Returns
    -------
    DecodedImage

    Raises
    ------
    NonImageObject
        No pixel data in an SR, KO, PR, RT ... object.
    NoPixelData
        No (7FE0,0010), (7FE0,0008) or (7FE0,0009) element in an image object.
    TruncatedFile
        Native pixel data shorter than Rows x Columns x Samples x Frames needs.
    UnsupportedTransferSyntax
        No installed decoder handles the transfer syntax.
    DecodeError
        Anything else that goes wrong while decoding.
    """
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    try:
        return _decode(ds, path, frames, min_side)
    except InputError:
        raise
    except INTERRUPTS:
        raise
    except BaseException as exc:  # a malformed data set can trip pydicom (or panic a codec) anywhere
        raise DecodeError(path, describe(exc)) from exc


def _decode(ds: Dataset, path: str, frames: int, min_side: int | None) -> DecodedImage:
    if not any(tag in ds._dict for tag in PIXEL_TAGS):
        reason = non_image_reason(header_from_dataset(ds, path))
        if reason is not None:
            raise NonImageObject(path, reason)
        raise NoPixelData(path, "no (7FE0,0010), (7FE0,0008) or (7FE0,0009) element")

    tsyntax = transfer_syntax_of(ds)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise UnsupportedTransferSyntax(path, f"{tsyntax.name} ({tsyntax})") from exc

    overrides = _image_pixel_defaults(ds)
    try:
        opts = as_pixel_options(ds, **overrides)
        n_total = int(opts["number_of_frames"])
    except (TypeError, ValueError, KeyError) as exc:
        raise DecodeError(path, f"invalid Image Pixel module: {exc}") from exc
    photometric = str(opts.get("photometric_interpretation", "")).strip().upper() or "MONOCHROME2"
    if decoder.is_native:
        _check_native_length(ds, opts, path)

    plugins = _plugin_order(decoder)
    greys: list[np.ndarray] = []
    colour_scores: list[float] = []
    reduced_frames = 0
    steps: set[int] = set()
    for index in select_frames(n_total, frames):
        small = None
        if min_side is not None and decoder.is_encapsulated:
            small = _decode_reduced(ds, index, tsyntax, opts, min_side, path)
        reduced_frames += small is not None
        arr, props = small or _decode_frame(decoder, ds, index, opts, overrides, plugins, path)
        steps.add(int(props.get("grid_step", 1)))
        try:
            grey, score = _to_grey(arr, props, ds, index, photometric, opts)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
            raise DecodeError(path, f"frame {index}: {type(exc).__name__}: {exc}") from exc
        greys.append(grey)
        colour_scores.append(score)
    if 0 < reduced_frames < len(greys) or len(steps) > 1:
        # One frame would not reduce, or not as far as the others: all in full, to stack them.
        return _decode(ds, path, frames, None)
    stored = (int(opts["rows"]), int(opts["columns"]))
    reduced_shape = bool(reduced_frames) and greys[0].shape != stored
    return DecodedImage(
        frames=stack_frames(greys),  # each already finite float32 (_to_grey)
        colourfulness=float(np.mean(colour_scores)),
        n_frames_total=n_total,
        photometric=photometric,
        stored_shape=stored if reduced_shape else None,
        grid_step=steps.pop() if reduced_shape else 1,
    )


def _decode_reduced(
    ds: Dataset, index: int, tsyntax: Any, opts: dict[str, Any], min_side: int, path: str
) -> tuple[np.ndarray, dict[str, Any]] | None:
    """Frame `index` at a reduced resolution, or None: then the full decode runs, as for any other syntax."""
    try:
        return reduced.decode_reduced(ds, index, tsyntax, opts, min_side)
    except INTERRUPTS:
        raise
    except Exception as exc:  # Pillow and the marker parser raise assorted types; the full decode decides
        logger.debug("%s: frame %d: reduced decode failed (%s); decoding in full", path, index, describe(exc))
        return None


def _image_pixel_defaults(ds: Dataset) -> dict[str, Any]:
    """Decoder options for Image Pixel attributes that ACR-NEMA files leave out.

    Passed as overrides, so the caller's data set is never modified.
    """
    overrides: dict[str, Any] = {}
    spp = ds.get("SamplesPerPixel")
    if spp in (None, ""):
        spp = 1
        overrides["samples_per_pixel"] = 1
    if not str(ds.get("PhotometricInterpretation") or "").strip():
        overrides["photometric_interpretation"] = "MONOCHROME2" if spp == 1 else "RGB"
    return overrides


def _check_native_length(ds: Dataset, opts: dict[str, Any], path: str) -> None:
    """Raise TruncatedFile when uncompressed pixel data is shorter than the image needs."""
    try:
        rows, columns, samples, bits = (
            int(opts[key]) for key in ("rows", "columns", "samples_per_pixel", "bits_allocated")
        )
    except (KeyError, TypeError, ValueError):
        return  # let the decoder report what is missing
    if str(opts.get("photometric_interpretation", "")).upper() == "YBR_FULL_422":
        samples = 2  # two chroma samples shared by each pair of pixels (PS3.3 C.7.6.3.1.2)
    expected = math.ceil(rows * columns * samples * bits * int(opts["number_of_frames"]) / 8)
    tag = next(tag for tag in PIXEL_TAGS if tag in ds._dict)
    value = ds[tag].value
    actual = len(value) if value is not None else 0
    if actual < expected:
        raise TruncatedFile(path, f"pixel data has {actual} of the {expected} bytes the image needs")


def _plugin_order(decoder: Decoder) -> list[str]:
    available = list(decoder.available_plugins)
    if not available:
        return [""]  # native syntaxes: pydicom decodes them itself
    preferred = [name for name in _PREFERRED_PLUGINS if name in available]
    return preferred + [name for name in available if name not in preferred]


def _decode_frame(
    decoder: Decoder,
    ds: Dataset,
    index: int,
    opts: dict[str, Any],
    overrides: dict[str, Any],
    plugins: list[str],
    path: str,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode frame `index`, trying each plugin in turn; the one that worked moves first.

    When every plugin fails, GDCM is called directly for greyscale data (see
    :mod:`sorter.dicom.gdcm_frame`) before giving up.
    """
    # as_rgb: YBR_FULL(_422) comes back as RGB, and `props` says what the array holds.
    options: dict[str, Any] = {"as_rgb": True, **overrides}
    failures: list[str] = []
    last: BaseException | None = None
    for plugin in list(plugins):
        try:
            arr, props = decoder.as_array(ds, index=index, validate=True, decoding_plugin=plugin, **options)
        except INTERRUPTS:
            raise
        except BaseException as exc:  # every plugin raises its own types, a Rust one panics; try the next
            failures.append(f"{plugin or 'native'}: {describe(exc)}")
            last = exc
            continue
        if plugins[0] != plugin:
            plugins.remove(plugin)
            plugins.insert(0, plugin)
        return arr, props
    detail = f"frame {index}: " + "; ".join(failures)
    if decoder.is_available and gdcm_frame.can_decode(decoder.UID, opts):
        try:
            arr = gdcm_frame.decode_frame(ds, index, decoder.UID, opts)
        except Exception as exc:  # GDCM's SWIG layer raises assorted types
            raise DecodeError(path, f"{detail}; gdcm (direct): {describe(exc)}") from last
        logger.info("%s: frame %d decoded by GDCM directly after: %s", path, index, detail)
        return arr, {"photometric_interpretation": opts.get("photometric_interpretation")}
    if not decoder.is_available:
        raise UnsupportedTransferSyntax(path, f"{decoder.UID.name}: {detail}") from last
    raise DecodeError(path, detail) from last


def _to_grey(
    arr: np.ndarray,
    props: dict[str, Any],
    ds: Dataset,
    index: int,
    photometric: str,
    opts: dict[str, Any],
) -> tuple[np.ndarray, float]:
    """One decoded frame to grey float32, and its colourfulness (0.0 for greyscale)."""
    samples = arr.shape[-1] if arr.ndim == 3 else 1
    if samples == 1:
        if photometric == "PALETTE COLOR":
            rgb = palette_to_rgb(arr, ds)
            return rgb_to_grey(rgb), colourfulness(rgb)
        values = modality_lut(arr, ds, index)
        if photometric == "MONOCHROME1":
            values = invert_monochrome1(values)
        return finite_float32(values), 0.0
    decoded_as = str(props.get("photometric_interpretation", photometric)).strip().upper()
    if samples != 3 or decoded_as not in RGB_LIKE:
        raise ValueError(f"{samples} samples per pixel as {decoded_as!r} are not supported")
    bits = int(opts.get("bits_stored") or opts.get("bits_allocated") or 8)
    rgb = to_rgb255(arr, decoded_as, bits)
    return rgb_to_grey(rgb), colourfulness(rgb)
