"""``sorter status``: the pipeline at a glance, from the database."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import click

from sorter.commands.common import database, database_option, format_option, write_rows
from sorter.status import pipeline_status


def _when(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds")


def flatten(status: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``metric, value`` rows of :func:`~sorter.status.pipeline_status` for the table and CSV."""
    for key, n in status["instances"].items():
        yield {"metric": f"instances.{key}", "value": n}
    pending = status["pending"]
    yield {"metric": "pending", "value": pending["n"]}
    yield {"metric": "pending.oldest_registered_at", "value": _when(pending["oldest_registered_at"])}
    yield {"metric": "pending.oldest_age_s", "value": pending["oldest_age_s"]}
    for row in status["failed"]:
        yield {"metric": f"failed.{row['reason']}", "value": row["n"]}
    classified = status["classified"]
    yield {"metric": "classified.last_hour", "value": classified["last_hour"]}
    yield {"metric": "classified.last_day", "value": classified["last_day"]}
    yield {"metric": "classified.latest_prediction_at", "value": _when(classified["latest_prediction_at"])}
    yield {"metric": "discrepancies", "value": status["discrepancies"]}
    for model in status["models"]:
        # Keyed by the sha256 alone: an ensemble's arch has spaces ("efficientnet_lite0 +
        # mobilenet_v3_small (confirms headers)"), which broke the metric column for awk and cut.
        name = f"model.{model['sha256']}"
        yield {"metric": f"{name}.arch", "value": model["arch"]}
        yield {"metric": f"{name}.predictions", "value": model["predictions"]}
        yield {"metric": f"{name}.latest", "value": _when(model["latest"])}
    for row in status["rule_actions"]:
        yield {"metric": f"rules.{row['action']}.{row['status']}", "value": row["n"]}


@click.command()
@format_option
@database_option
def status(fmt: str, database_url: str | None) -> None:
    """Instances by status, pending backlog and its age, failures, recent throughput, models in use,
    and what rules did (``rules.forward.dead``: forwards that gave up, see `sorter rules apply`)."""
    with database(database_url) as (_engine, sessions), sessions() as session:
        result = pipeline_status(session)
    if fmt == "json":
        click.echo(json.dumps(result, indent=2, default=_json_default))
        return
    write_rows(flatten(result), ("metric", "value"), fmt)


def _json_default(value: object) -> str:
    return value.isoformat(timespec="seconds") if isinstance(value, datetime) else str(value)
