"""What C decoders write straight to the process's stderr, caught in decode processes and ``classify``.

OpenJPEG (inside Pillow, pylibjpeg-openjpeg and GDCM) reports a damaged codestream by writing
to file descriptor 2 from C: "Tile part length size inconsistent with stream length", once per
library that tries the frame. Python's logging and ``warnings`` never see it, so a scan of an
archive with damaged files printed those lines without a file name, between its progress
lines. In a decode process (:func:`install`, from :func:`sorter.decode.init_decode_process`),
:func:`caught` points descriptor 2 at a scratch file for the length of one decode and hands
back what was written; the caller adds it to the file's recorded reason, where it says what
was wrong, and drops it when the file decoded. Python's own ``sys.stderr`` keeps the terminal.

Only decode processes and the ``sorter classify`` command do this: swapping a descriptor is
process-wide, and each decodes one file at a time with no other thread writing (a decode
process's parent-watch thread only sleeps; ``classify`` runs the model between decodes). A
library caller of :func:`sorter.classify.classify_paths` keeps its descriptors as they are.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

#: Lines and characters kept of what a decode wrote (OpenJPEG repeats itself per library).
MAX_LINES, MAX_CHARS = 3, 300

_scratch: IO[bytes] | None = None
_terminal: int | None = None  # descriptor 2 as it was, restored after each decode


def install() -> None:
    """Catch native stderr in this process from now on (a decode process calls it once)."""
    global _scratch, _terminal
    if _scratch is not None:
        return
    sys.stderr.flush()
    _terminal = os.dup(2)
    # Python's writes (tracebacks, the last-resort log handler) keep going to the terminal.
    sys.stderr = os.fdopen(os.dup(_terminal), "w", buffering=1, errors="backslashreplace")
    _scratch = tempfile.TemporaryFile()  # noqa: SIM115 (kept open for the process's life)


@contextmanager
def caught() -> Iterator[list[str]]:
    """Within the block, what C code writes to stderr goes to a list instead (filled on exit).

    Outside a process that called :func:`install` the list stays empty and nothing moves.
    """
    said: list[str] = []
    if _scratch is None or _terminal is None:
        yield said
        return
    _scratch.seek(0)
    _scratch.truncate()
    os.dup2(_scratch.fileno(), 2)
    try:
        yield said
    finally:
        os.dup2(_terminal, 2)
        _scratch.seek(0)
        said.extend(_lines(_scratch.read(64 * 1024)))


def with_said(detail: str, said: list[str]) -> str:
    """A failed file's detail, with what the decoder wrote (if anything) after it."""
    return f"{detail} (the decoder said: {'; '.join(said)})" if said else detail


def _lines(raw: bytes) -> list[str]:
    unique: list[str] = []
    for line in raw.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if line and line not in unique:
            unique.append(line[:MAX_CHARS])
    return unique[:MAX_LINES]
