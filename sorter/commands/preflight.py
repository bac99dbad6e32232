"""Checks a command makes before it starts work: each failure is one line that says what to do.

A command that would otherwise fail later (a traceback from torch for a GPU that is not there, a
kombu error from the first batch sent to a broker that is down, pynetdicom's ``ValueError`` for an
AE title) calls these first and exits non-zero with a :class:`click.ClickException` instead.
"""

from __future__ import annotations

import string

import click

#: DICOM PS3.5 §6.2, AE: at most 16 characters of the default repertoire, no backslash, no
#: control characters, and not only spaces (leading and trailing spaces are not significant).
AE_TITLE_MAX = 16
_AE_CHARACTERS = frozenset(string.printable) - frozenset("\\\t\n\r\x0b\x0c")


def ae_title_problem(title: str) -> str | None:
    """Why ``title`` is not a valid AE title, or ``None`` when it is."""
    if not title.strip():
        return "it is empty"
    if len(title) > AE_TITLE_MAX:
        return f"it has {len(title)} characters, at most {AE_TITLE_MAX} are allowed"
    bad = sorted(set(title) - _AE_CHARACTERS)
    if bad:
        return f"it contains {', '.join(repr(c) for c in bad)} (printable ASCII only, no backslash)"
    return None


class AeTitles(click.ParamType):
    """AE titles, one per use of a repeated option; from an environment variable, separated by
    commas when it holds one (an AE title may hold inner spaces: ``CT SCANNER 1,PACS01``), else by
    spaces (``ORTHANC PACS01``). Commas are legal in AE titles but no sender we know uses them."""

    name = "text"

    def split_envvar_value(self, rv: str) -> list[str]:
        """``rv`` split on commas (each part stripped) when it holds one, else on whitespace."""
        if "," in rv:
            return [part.strip() for part in rv.split(",") if part.strip()]
        return rv.split()


def validate_ae_title(ctx: click.Context, param: click.Parameter, value: object) -> object:
    """Click callback for an AE title option (one value, or a tuple of them for a repeated option)."""
    if value is None:
        return value
    for title in value if isinstance(value, tuple) else (value,):
        problem = ae_title_problem(str(title))
        if problem:
            raise click.BadParameter(f"{str(title)!r} is not a DICOM AE title: {problem}", ctx, param)
    return value


def require_device(requested: str | None) -> None:
    """Refuse a ``--device`` this host cannot run on (``None``, the default, always works).

    Checked at start so that a worker never reports ready and then fails every task, and a
    scan never registers files it cannot classify.
    """
    from sorter.model.devices import device_problem

    problem = device_problem(requested)
    if problem is not None:
        raise click.ClickException(f"--device {problem}")


def require_broker(url: str | None, timeout_s: float = 5.0) -> None:
    """Refuse to start when ``SORTER_BROKER_URL`` is set and the broker does not answer.

    Without the check the first batch sent raises kombu's ``OperationalError`` with a traceback
    after files were already registered.
    """
    if not url:
        return
    from kombu import Connection
    from kombu.utils.url import maybe_sanitize_url

    shown = maybe_sanitize_url(url)  # never print the broker's password
    try:
        with Connection(url, connect_timeout=timeout_s) as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout_s)
    except Exception as exc:
        raise click.ClickException(
            f"cannot reach the broker {shown}: {one_line(exc)}; start it (or fix SORTER_BROKER_URL), "
            "or unset SORTER_BROKER_URL to classify in this process"
        ) from exc


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when it has none)."""
    text = str(exc).strip().splitlines()
    return text[0].rstrip(".") if text else type(exc).__name__


def exit_for_signal(received: list[int]) -> None:
    """After a clean stop: status 0 for Ctrl-C (the documented way to stop a foreground service),
    143 (128 + 15) for SIGTERM, as a shell reports a process that SIGTERM ended."""
    import signal

    if signal.SIGTERM in received:
        raise click.exceptions.Exit(128 + signal.SIGTERM)
