"""The JSON log format: one object per line with the standard fields and the ``extra=`` ones."""

from __future__ import annotations

import json
import logging
import sys

from click.testing import CliRunner

from sorter.cli import main
from sorter.logs import JsonFormatter


def _record(**extra: object) -> logging.LogRecord:
    logger = logging.getLogger("sorter.test")
    try:
        raise ValueError("bad pixels")
    except ValueError:
        exc_info = sys.exc_info()
    record = logger.makeRecord(
        "sorter.test",
        logging.WARNING,
        __file__,
        1,
        "SOP Instance UID %s failed",
        ("1.2.3",),
        exc_info,
        extra=extra,
    )
    return record


def test_json_lines_carry_the_message_level_logger_time_extra_and_exception():
    line = JsonFormatter().format(_record(sop_instance_uid="1.2.3", batch=4))

    document = json.loads(line)
    assert "\n" not in line
    assert document["message"] == "SOP Instance UID 1.2.3 failed"
    assert document["level"] == "WARNING" and document["logger"] == "sorter.test"
    assert document["time"].endswith("+00:00")
    assert document["sop_instance_uid"] == "1.2.3" and document["batch"] == 4
    assert "ValueError: bad pixels" in document["exc_info"]
    assert "args" not in document and "msg" not in document


def test_the_group_accepts_the_log_format():
    result = CliRunner().invoke(main, ["--log-format", "json", "--help"])
    assert result.exit_code == 0
    bad = CliRunner().invoke(main, ["--log-format", "xml", "status"])
    assert bad.exit_code == 2
