"""Series actions: ``notify`` (one webhook call per series) and ``orthanc`` (the series' verdict
written into Orthanc's metadata), each once the series is complete.

A rule that matches an instance queues it (``rule_actions`` ``pending``). The series is complete
when no instance of it has arrived for ``quiet_s`` seconds and none is still waiting to be
classified (as mercure decides series completion); then its summary, as ``series_summary``
shows it, is POSTed as JSON, once for all the queued instances of the series. Failures back off
and dead-letter like forwards. The payload names UIDs, labels, verdicts and counts, never a
patient: the same rule as the logs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sorter import __version__
from sorter.errors import describe

TIMEOUT_S = 10.0

#: series_summary columns the payload carries, under these names.
PAYLOAD_FIELDS = {
    "series_instance_uid": "series_instance_uid",
    "study_instance_uid": "study_instance_uid",
    "header_modality": "header_modality",
    "header_label": "header_label",
    "label": "label",
    "confidence": "confidence",
    "verdict": "verdict",
    "n_instances": "n_instances",
    "n_disagree": "n_disagree",
    "n_uncertain": "n_uncertain",
    "source": "source",
    "station_name": "station_name",
    "institution_name": "institution_name",
}


@dataclass(frozen=True)
class NotifyAction:
    """POST a series' summary to ``url`` once it has been quiet for ``quiet_s`` seconds."""

    url: str
    quiet_s: float = 60.0
    kind: str = "notify"
    how: str = "webhook"

    @property
    def to(self) -> str:
        """The webhook, as messages and ``rule_actions`` show it (:func:`shown_url`)."""
        return shown_url(self.url)

    def target(self, _facts: dict[str, Any]) -> str:
        """Where the notification goes, as shown (the same for every instance)."""
        return self.to

    def deliver(self, rule: str, series: dict[str, Any]) -> tuple[str | None, str | None]:
        """POST the series' summary; ``(None, None)`` on a 2xx answer."""
        return post(self.url, payload(rule, series))


def payload(rule: str, series: dict[str, Any]) -> dict[str, Any]:
    """The JSON body for one series (a ``series_summary`` row)."""
    body: dict[str, Any] = {"event": "series", "rule": rule, "sent_at": datetime.now(UTC).isoformat()}
    for column, name in PAYLOAD_FIELDS.items():
        value = series.get(column)
        body[name] = float(value) if isinstance(value, float) else value
    body["sorter_version"] = __version__
    return body


def shown_url(url: str) -> str:
    """A webhook as messages, logs and the database show it: scheme, host and port, and a fingerprint.

    A webhook's path or query is often its secret (Slack, Teams and Mattermost put the token in
    the path) and its user info a password, so neither is ever written anywhere; the first 8 hex
    digits of the whole URL's SHA-256 tell two webhooks on one host apart
    (``https://hooks.example.org/... #3f2a9c01``).
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    hidden = "/..." if (parts.path.strip("/") or parts.query or parts.fragment) else ""
    return f"{parts.scheme}://{host}{port}{hidden} #{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def post(url: str, body: dict[str, Any], timeout_s: float = TIMEOUT_S) -> tuple[str | None, str | None]:
    """POST ``body``; ``(None, None)`` on a 2xx answer, else ``(reason, one line)`` naming the
    webhook as :func:`shown_url` does."""
    try:
        _request(url, "POST", json.dumps(body, default=str).encode(), timeout_s, "application/json")
        return None, None
    except urllib.error.HTTPError as exc:
        return "webhook_refused", f"{shown_url(url)} answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return "webhook_unreachable", f"{shown_url(url)}: {describe(exc)}"


def _request(
    url: str, method: str, body: bytes, timeout_s: float = TIMEOUT_S, content_type: str | None = None
) -> bytes:
    """One HTTP request; credentials in the URL (``http://user:pass@host``) become Basic auth."""
    parts = urllib.parse.urlsplit(url)
    headers = {"User-Agent": f"dicom-sorter/{__version__}"}
    if content_type:
        headers["Content-Type"] = content_type
    if parts.username:
        token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else ""
        url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return bytes(response.read())


def verdict_text(series: dict[str, Any]) -> str:
    """What the write-back stores: the series' verdict in one line, no patient data."""
    confidence = series.get("confidence")
    shown = f" {float(confidence):.2f}" if confidence is not None else ""
    return (
        f"{series.get('verdict')}: header {series.get('header_label') or '-'}, "
        f"pixels {series.get('label') or '-'}{shown}, "
        f"{series.get('n_disagree') or 0} of {series.get('n_instances') or 0} instances disagree"
    )


@dataclass(frozen=True)
class OrthancAction:
    """Write the series' verdict into Orthanc's metadata ``metadata`` of the series, once the
    series is complete. Orthanc finds the series by its UID (``/tools/lookup``); the metadata
    must be declared in its ``UserMetadata`` (a number from 1024)."""

    url: str
    metadata: str = "SorterVerdict"
    quiet_s: float = 60.0
    kind: str = "orthanc"
    how: str = "metadata"

    @property
    def to(self) -> str:
        """Where the verdict goes, as messages show it (credentials left out)."""
        parts = urllib.parse.urlsplit(self.url)
        host = parts.hostname or ""
        return (
            f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path} ({self.metadata})"
        )

    def target(self, _facts: dict[str, Any]) -> str:
        """Where the verdict goes (the same for every instance)."""
        return self.to

    def deliver(self, rule: str, series: dict[str, Any]) -> tuple[str | None, str | None]:
        """Find the series in Orthanc and write its verdict; ``(None, None)`` when written."""
        del rule
        base = self.url.rstrip("/")
        uid = str(series.get("series_instance_uid") or "")
        try:
            found = json.loads(_request(f"{base}/tools/lookup", "POST", uid.encode()))
            ids = [item["ID"] for item in found if item.get("Type") == "Series"]
            if not ids:  # not stored there yet, perhaps: tried again later
                return "not_in_orthanc", f"{self.to} has no series {uid}"
            _request(f"{base}/series/{ids[0]}/metadata/{self.metadata}", "PUT", verdict_text(series).encode())
        except urllib.error.HTTPError as exc:
            return "orthanc_refused", f"{self.to} answered HTTP {exc.code}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return "orthanc_unreachable", f"{self.to}: {describe(exc)}"
        return None, None


#: Actions that act once per complete series.
SeriesAction = NotifyAction | OrthancAction
