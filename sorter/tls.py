"""TLS certificate and key files, loaded with messages an administrator can act on.

The ``ssl`` module says "[SSL] PEM lib (_ssl.c:3905)" for a certificate and key given the wrong
way round, and for an encrypted key OpenSSL asks for its pass phrase on the terminal, which a
service does not have. The listener (``--tls-cert``/``--tls-key``/``--tls-ca``) and forward rules
(``tls_cert``/``tls_key``/``tls_ca``) load their files through here.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager

from sorter.errors import ConfigError


class _Encrypted(Exception):
    """Raised from the pass-phrase callback: OpenSSL would otherwise prompt on the terminal."""


def _no_pass_phrase() -> str:
    raise _Encrypted


def _why(exc: ssl.SSLError) -> str:
    if exc.reason == "KEY_VALUES_MISMATCH":
        return "the key does not belong to the certificate"
    if exc.reason == "NO_CERTIFICATE_OR_CRL_FOUND":
        return "it holds no PEM certificate"
    if exc.library == "SSL" and "PEM lib" in str(exc):
        return "not a PEM certificate and its PEM private key (given the wrong way round?)"
    return str(exc)


@contextmanager
def _explained(what: str) -> Iterator[None]:
    """Turn what loading ``what`` raised into one :class:`ConfigError` line."""
    try:
        yield
    except _Encrypted:
        raise ConfigError(
            f"cannot use {what}: the key is encrypted; give an unencrypted copy readable by this "
            "service only (openssl pkey -in KEY -out PLAIN.pem)"
        ) from None
    except ssl.SSLError as exc:
        raise ConfigError(f"cannot use {what}: {_why(exc)}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot use {what}: {exc.strerror or exc}") from exc


def load_identity(context: ssl.SSLContext, cert: str, key: str | None, *, names: tuple[str, str]) -> None:
    """Load our certificate and its private key into ``context``; ``names`` are how the user set
    the two files (``("--tls-cert", "--tls-key")`` or a rule's keys), for the message.

    Raises
    ------
    ConfigError
        A file is missing, is not PEM, the key does not match, or it is encrypted.
    """
    with _explained(f"{names[0]} {cert} with {names[1]} {key}"):
        context.load_cert_chain(certfile=cert, keyfile=key, password=_no_pass_phrase)


def load_authorities(context: ssl.SSLContext, ca: str, *, name: str) -> None:
    """Load the CA certificates ``context`` checks the peer against.

    Raises
    ------
    ConfigError
        The file is missing or holds no PEM certificate.
    """
    with _explained(f"{name} {ca}"):
        context.load_verify_locations(cafile=ca)


def client_context(ca: str | None, *, name: str) -> ssl.SSLContext:
    """A client context that checks the server against ``ca`` only, or the system's CAs without it.

    Raises
    ------
    ConfigError
        ``ca`` is missing or holds no PEM certificate.
    """
    with _explained(f"{name} {ca}"):
        return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
