"""Keep pydicom's conformance warnings out of a service's output.

Real archives are full of small conformance slips (a UID with a trailing
space, 'ISO-IR 100' for 'ISO_IR 100'); pydicom warns about each one, once per
file, which buries the messages that matter. Entry points and worker
processes call :func:`quiet_pydicom`; a library user who imports ``sorter``
keeps pydicom's defaults.
"""

from __future__ import annotations

import logging
import warnings

from pydicom import config


def quiet_pydicom(verbose: bool = False) -> None:
    """Silence pydicom's validation and charset warnings, and its decoder errors, unless ``verbose``.

    pydicom logs every decoding plugin that fails on a frame as an ERROR with its traceback (three
    for a damaged JPEG 2000 frame: pylibjpeg, GDCM, Pillow); the caller records the file's own
    one-line reason (``decode_error``) instead, so only CRITICAL gets through.
    """
    if verbose:
        return
    config.settings.reading_validation_mode = config.IGNORE
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\..*)?$")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
