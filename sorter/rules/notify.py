"""The ``notify`` action: one webhook call per series, once the series is complete.

A rule that matches an instance queues it (``rule_actions`` ``pending``). The series is complete
when no instance of it has arrived for ``quiet_s`` seconds and none is still waiting to be
classified (as mercure decides series completion); then its summary, as ``series_summary``
shows it, is POSTed as JSON, once for all the queued instances of the series. Failures back off
and dead-letter like forwards. The payload names UIDs, labels, verdicts and counts, never a
patient: the same rule as the logs.
"""

from __future__ import annotations

import json
import urllib.error
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
        """The webhook, as messages show it."""
        return self.url

    def target(self, _facts: dict[str, Any]) -> str:
        """Where the notification goes (the same for every instance)."""
        return self.url


def payload(rule: str, series: dict[str, Any]) -> dict[str, Any]:
    """The JSON body for one series (a ``series_summary`` row)."""
    body: dict[str, Any] = {"event": "series", "rule": rule, "sent_at": datetime.now(UTC).isoformat()}
    for column, name in PAYLOAD_FIELDS.items():
        value = series.get(column)
        body[name] = float(value) if isinstance(value, float) else value
    body["sorter_version"] = __version__
    return body


def post(url: str, body: dict[str, Any], timeout_s: float = TIMEOUT_S) -> tuple[str | None, str | None]:
    """POST ``body``; ``(None, None)`` on a 2xx answer, else ``(reason, one line)``."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body, default=str).encode(),
        headers={"Content-Type": "application/json", "User-Agent": f"dicom-sorter/{__version__}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
        return None, None
    except urllib.error.HTTPError as exc:
        return "webhook_refused", f"{url} answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return "webhook_unreachable", f"{url}: {describe(exc)}"
