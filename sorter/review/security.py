"""Who may use the review page, and proof that a state-changing request came from it.

The page shows patients' pixels, so access is the first concern: loopback only unless a token or
basic-auth credentials are set (``sorter serve`` refuses a non-loopback bind without one). A
browser that proves the token once, on ``/login``, gets a signed session cookie (HttpOnly,
SameSite=Strict); API clients send ``Authorization: Bearer TOKEN``. Basic auth is checked on every
request, as browsers expect.

CSRF: every form carries a token derived from the session (HMAC with a per-process secret), and
every POST must present it and come from the page's own origin (Origin or Referer). SameSite=Strict
alone is not enough for a loopback page: another local site on another port is the same site.

Written here rather than taken from a middleware package because it is small, ours to audit, and
the known packages (starlette-csrf, starlette-wtf) each cover half: cookie-session login plus
HMAC form tokens plus an origin check is the whole of it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

SESSION_COOKIE = "sorter_review"
#: How long a login lasts.
SESSION_SECONDS = 12 * 3600


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only listens on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class Access:
    """The access settings of one ``sorter serve``."""

    token: str | None = None
    basic_user: str | None = None
    basic_password: str | None = None
    #: Name recorded on decisions when basic auth does not name the reviewer.
    reviewer: str = "reviewer"
    #: Host headers accepted (empty: any). Without a login, the loopback names only: a web page
    #: that rebinds its own domain to 127.0.0.1 (DNS rebinding) must not read the pages.
    allowed_hosts: tuple[str, ...] = ()
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    @property
    def required(self) -> bool:
        """Whether requests must authenticate (a token or basic auth is set)."""
        return bool(self.token or self.basic_user)

    # -- sessions (token login) ------------------------------------------------------------
    def _sign(self, payload: str) -> str:
        return hmac.new(self.secret, payload.encode(), hashlib.sha256).hexdigest()

    def new_session(self, now: float | None = None) -> str:
        """A signed session value: random id, expiry, signature."""
        expires = int((now or time.time()) + SESSION_SECONDS)
        payload = f"{secrets.token_hex(16)}.{expires}"
        return f"{payload}.{self._sign(payload)}"

    def valid_session(self, value: str | None, now: float | None = None) -> bool:
        """Whether a session cookie was issued by this process and has not expired."""
        if not value or value.count(".") != 2:
            return False
        ident, expires, signature = value.split(".")
        if not hmac.compare_digest(signature, self._sign(f"{ident}.{expires}")):
            return False
        return expires.isdigit() and int(expires) > (now or time.time())

    def check_token(self, candidate: str) -> bool:
        """Constant-time comparison with the configured token."""
        return bool(self.token) and hmac.compare_digest(candidate.encode(), (self.token or "").encode())

    def check_basic(self, header: str | None) -> str | None:
        """The user name when an ``Authorization: Basic`` header matches, else ``None``."""
        if not (header and self.basic_user and header.lower().startswith("basic ")):
            return None
        try:
            user, _, password = base64.b64decode(header[6:].strip()).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        ok_user = hmac.compare_digest(user.encode(), self.basic_user.encode())
        ok_password = hmac.compare_digest(password.encode(), (self.basic_password or "").encode())
        return user if ok_user and ok_password else None

    # -- CSRF --------------------------------------------------------------------------------
    def csrf_token(self, session: str) -> str:
        """The form token of ``session`` (any stable per-client string)."""
        return self._sign("csrf:" + session)

    def check_csrf(self, session: str, candidate: str | None) -> bool:
        """Whether ``candidate`` is ``session``'s form token."""
        return bool(candidate) and hmac.compare_digest(candidate or "", self.csrf_token(session))


#: Host names that reach a loopback bind.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def same_origin(origin: str | None, referer: str | None, host: str | None) -> bool:
    """Whether a POST came from a page of this server (``Origin``, else ``Referer``, names ``host``)."""
    source = origin if origin and origin != "null" else referer
    if not source or not host:
        return False
    return urlsplit(source).netloc.lower() == host.lower()


def root_path_of(text: str | None) -> str:
    """``--root-path`` as the app takes it: ``""`` for none or ``/``, else ``/a/b`` (no trailing
    slash); ``ValueError`` for one a URL cannot carry as it is (the pages' links are built on it)."""
    value = (text or "").strip().rstrip("/")
    if not value:
        return ""
    parts = value.split("/")
    if (
        not value.startswith("/")
        or any(part in ("", ".", "..") for part in parts[1:])
        or not all(ch.isascii() and (ch.isalnum() or ch in "-._~/") for ch in value)
    ):
        raise ValueError(
            f"--root-path must be a URL path such as /sorter (letters, digits, - . _ ~ between slashes), "
            f"not {text!r}"
        )
    return value
