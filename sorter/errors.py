"""Typed errors. Every error about a file carries its path and a short machine reason.

The ``reason`` strings are stored in the database and printed by
``sorter classify``; keep them stable.
"""

from __future__ import annotations

from sorter.domain import FailureReason

#: What stops the program on purpose. Anything else raised while one file is read or decoded
#: is that file's fault, ``BaseException`` subclasses included: a Rust codec (pylibjpeg-rle,
#: through PyO3) panics with ``pyo3_runtime.PanicException``, which ``except Exception`` misses
#: and which cannot be pickled back from a decode process.
INTERRUPTS: tuple[type[BaseException], ...] = (KeyboardInterrupt, SystemExit, GeneratorExit)


def describe(exc: BaseException) -> str:
    """``Type: message``, the one-line form of an unexpected error stored as a ``detail``."""
    return f"{type(exc).__name__}: {exc}"


class SorterError(Exception):
    """Base class of every error dicom-sorter raises on purpose."""

    reason = "error"


class InputError(SorterError):
    """A problem with one input file; never fatal for a batch."""

    reason = "input_error"

    def __init__(self, path: str, detail: str = "") -> None:
        self.path = str(path)
        self.detail = detail
        message = f"{self.path}: {self.reason}"
        if detail:
            message += f" ({detail})"
        super().__init__(message)


class NotDicom(InputError):
    """The file is not a DICOM Part 10 file nor a readable raw data set."""

    reason = FailureReason.NOT_DICOM


class TruncatedFile(InputError):
    """The file ends before the data set (or its pixel data) does."""

    reason = FailureReason.TRUNCATED


class NoPixelData(InputError):
    """An image SOP class without a Pixel Data element."""

    reason = FailureReason.NO_PIXEL_DATA


class UnsupportedTransferSyntax(InputError):
    """No installed decoder handles the transfer syntax."""

    reason = FailureReason.UNSUPPORTED_TRANSFER_SYNTAX


class DecodeError(InputError):
    """The pixel data is present but could not be decoded."""

    reason = FailureReason.DECODE_ERROR


class NonImageObject(InputError):
    """SR, RT*, KO, PR, SEG, waveforms, DICOMDIR ...: skipped, not failed."""

    reason = FailureReason.NON_IMAGE


class BlankImage(NonImageObject):
    """Every pixel of what was read holds one value: nothing shows what made the image."""

    reason = FailureReason.BLANK


class UnreadableFile(InputError):
    """The file vanished or cannot be opened (permissions, I/O error)."""

    reason = FailureReason.UNREADABLE


class ConfigError(SorterError, ValueError):
    """A setting (a ``SORTER_`` variable or an option) that cannot be used; named in the message."""

    reason = "config_error"


class ModelError(SorterError):
    """A model artefact that cannot be used."""

    reason = "model_error"


class IncompatibleModelError(ModelError):
    """The artefact's format version, checksum or spec does not match this code."""

    reason = "incompatible_model"


class QueueUnavailable(SorterError):
    """Registered instances could not be sent to the broker; they stay ``pending``.

    Nothing is lost: the next scan, a listener's reconnection sweep or a worker's
    sweep (``SORTER_SWEEP_AGE``) sends them. Raised so that the message names the
    broker, not the registration, as what failed.
    """

    reason = "queue_unavailable"

    def __init__(self, count: int, cause: BaseException) -> None:
        self.count = count
        super().__init__(
            f"cannot send {count} registered instances to the queue ({type(cause).__name__}: {cause}); "
            "they stay pending and are sent once the broker is back"
        )
