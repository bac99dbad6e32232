"""File names that are not valid UTF-8: stored losslessly, shown readably.

POSIX file names are bytes. Python hands a name that is not valid UTF-8 (say
``caf\\xe9.dcm`` from an old Latin-1 share) over as a ``str`` holding lone
surrogates (PEP 383), which every ``os`` call accepts but no database text
column, JSON encoder or UTF-8 terminal does. So:

- :func:`encode_path` is what the database stores: the path itself when it is
  valid UTF-8, otherwise a ``file://`` form of its bytes in which each byte
  that is not UTF-8 is written ``%XX`` and ``%`` itself ``%25``. The mapping is
  one to one (a valid path that happens to start with ``file://`` is escaped
  too), so :func:`decode_path` gives back the very name the file system had.
- :func:`display_path` is what people see: the undecodable bytes as ``\\xe9``.
"""

from __future__ import annotations

import os
import re

#: Marks a stored path whose bytes are escaped (RFC 8089's scheme, percent-encoding of bytes).
ESCAPED = "file://"
_SURROGATES = re.compile("[\udc80-\udcff%]")
_PERCENT = re.compile("%([0-9A-F]{2})")


def is_utf8(text: str) -> bool:
    """True when ``text`` holds no lone surrogate (no undecodable file-name byte)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def encode_path(path: str) -> str:
    """The text the database stores for ``path``; ``path`` itself unless it must be escaped."""
    if is_utf8(path) and not path.startswith(ESCAPED):
        return path
    return _escaped(path)


def _escaped(path: str) -> str:
    body = _SURROGATES.sub(lambda m: "%25" if m[0] == "%" else f"%{ord(m[0]) - 0xDC00:02X}", path)
    if not is_utf8(body):  # a surrogate no file system produces (outside U+DC80..U+DCFF)
        raise ValueError(f"not a file-system path: {path!r}")
    return ESCAPED + body


def stored_prefixes(prefix: str) -> list[str]:
    """What the stored form of any path that starts with ``prefix`` starts with (one or two forms)."""
    forms = [_escaped(prefix)]
    if is_utf8(prefix) and not prefix.startswith(ESCAPED):
        forms.insert(0, prefix)
    return forms


def decode_path(text: str) -> str:
    """The path :func:`encode_path` stored as ``text``."""
    if not text.startswith(ESCAPED):
        return text
    return _PERCENT.sub(lambda m: "%" if m[1] == "25" else chr(0xDC00 + int(m[1], 16)), text[len(ESCAPED) :])


def display_path(path: str | os.PathLike[str]) -> str:
    """``path`` for messages and reports: undecodable bytes shown as ``\\xe9``, never a surrogate."""
    return readable(os.fspath(path))


def readable(text: str) -> str:
    """Text that may quote a file name (a detail, a source name), safe for UTF-8 output and columns."""
    if is_utf8(text):
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
