"""A rules file: what to match and what to do, read from TOML and checked line by line.

::

    mode = "all"                    # every rule that matches acts ("first": only the first)

    [[rule]]
    name = "file-by-label"
    [rule.match]                    # all conditions hold; a list means any of its values
    verdict = ["agree", "disagree"]
    min_confidence = 0.5
    [rule.file]
    to = "$SORTER_FILE_ROOT/{label}/{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
    how = "copy"                    # copy | link (hard link) | move
    [rule.forward]                  # C-STORE, queued and retried (sorter.rules.forward)
    ae_title = "PACS"
    host = "$PACS_HOST"
    port = 104
    [rule.notify]                   # one webhook call per complete series (sorter.rules.notify)
    url = "$SORTER_NOTIFY_URL"
    quiet_s = 60
    [rule.orthanc]                  # the series' verdict into Orthanc's metadata, once complete
    url = "http://orthanc:8042"
    metadata = "SorterVerdict"      # declared in Orthanc's UserMetadata

TOML because Python reads it without a dependency (:mod:`tomllib`) and its syntax errors carry
a line; the checks here find the line of every other mistake themselves (tomllib keeps none).
"""

from __future__ import annotations

import math
import os
import re
import string
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sorter.domain import Label, Verdict
from sorter.errors import ConfigError, SorterError
from sorter.rules.forward import ForwardAction
from sorter.rules.notify import NotifyAction, OrthancAction

#: Conditions on one value each; a string or a list of strings (any of them). Labels and verdicts
#: are checked against their names; the others are shell-style patterns (``"CT_*"``).
LABEL_FIELDS = {"label": "predicted label", "header": "header label", "series_label": "series' label"}
VERDICT_FIELDS = {"verdict": "instance", "series_verdict": "series", "study_verdict": "study"}
PATTERN_FIELDS = {
    "calling_ae": "calling AE title",
    "station": "station name",
    "institution": "institution name",
    "source": "source",
    "sop_class": "SOP Class UID",
    "modality": "header Modality (0008,0060)",
}
RANGE_FIELDS = {"min_confidence", "max_confidence"}
MATCH_FIELDS = (*LABEL_FIELDS, *VERDICT_FIELDS, *PATTERN_FIELDS, *RANGE_FIELDS)

#: What a ``file`` target may name: values the database holds, never a patient identifier.
TEMPLATE_FIELDS = {
    "label",
    "header_label",
    "verdict",
    "series_verdict",
    "modality",
    "source",
    "station",
    "calling_ae",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
}
FILE_MODES = ("copy", "link", "move")
ACTIONS = ("file", "forward", "notify", "orthanc")
RULE_KEYS = ("name", "match", *ACTIONS)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class RulesError(SorterError):
    """A rules file that cannot be used; ``problems`` holds one ``FILE:LINE: message`` each."""

    reason = "bad_rules"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class FileAction:
    """Put the instance's file at ``to`` (a template), by copy, hard link or move."""

    to: str
    how: str = "copy"
    kind: str = "file"

    def target(self, facts: dict[str, Any]) -> Path:
        """The target path for one instance: every field made safe as one path component."""
        values = {name: _component(facts.get(name)) for name in TEMPLATE_FIELDS}
        return Path(self.to.format(**values))


Action = FileAction | ForwardAction | NotifyAction | OrthancAction


@dataclass(frozen=True)
class Rule:
    """One rule: every condition in ``match`` holds, then each action acts."""

    name: str
    match: dict[str, Any] = field(default_factory=dict)
    actions: tuple[Action, ...] = ()
    line: int = 0


@dataclass(frozen=True)
class RuleSet:
    """The rules of one file, and whether only the first that matches acts."""

    path: Path
    mode: str
    rules: tuple[Rule, ...]


def _component(value: Any) -> str:
    """A value as one safe path component: no separators, no ``..``, never empty."""
    text = re.sub(r"[^A-Za-z0-9._-]", "_", str(value)) if value not in (None, "") else "unknown"
    return text if text.strip(".") else "unknown"


class _Lines:
    """Where a rule and its keys are in the file, for messages (tomllib keeps no positions)."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.starts = [i + 1 for i, line in enumerate(self.lines) if re.match(r"\s*\[\[\s*rule\s*\]\]", line)]

    def of_rule(self, index: int) -> int:
        return self.starts[index] if index < len(self.starts) else 0

    def of_key(self, index: int, key: str) -> int:
        start = self.of_rule(index) if index >= 0 else 1
        end = self.starts[index + 1] if 0 <= index < len(self.starts) - 1 else len(self.lines) + 1
        if index < 0:
            end = self.starts[0] if self.starts else len(self.lines) + 1
        pattern = re.compile(rf"\s*(\[\s*rule\.)?{re.escape(key)}\s*(=|\])")
        for number in range(max(start, 1), end):
            if pattern.match(self.lines[number - 1]):
                return number
        return start


def load_rules(path: Path) -> RuleSet:
    """Read and check a rules file; :class:`RulesError` lists every problem with its line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError([f"{path}: not valid TOML: {exc}"]) from exc
    lines = _Lines(text)
    problems: list[str] = []

    def problem(line: int, message: str) -> None:
        problems.append(f"{path}:{line}: {message}")

    for key in data:
        if key not in ("mode", "rule"):
            problem(
                lines.of_key(-1, key), f"unknown setting {key!r}; the file has `mode` and [[rule]] tables"
            )
    mode = data.get("mode")
    if mode not in ("all", "first"):
        problem(
            lines.of_key(-1, "mode"),
            'state the mode: mode = "all" (every rule that matches acts) or "first" (only the first)',
        )
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list) or not raw_rules:
        problem(1, "no rules: add a [[rule]] table")
        raw_rules = []
    rules, names = [], set()
    for index, raw in enumerate(raw_rules):
        name = raw.get("name") if isinstance(raw, dict) else None
        if isinstance(name, str) and name in names:
            problem(lines.of_key(index, "name"), f"a second rule is named {name!r}; names must be unique")
        names.add(name)
        rule = _check_rule(index, raw if isinstance(raw, dict) else {}, lines, problem)
        if rule is not None:
            rules.append(rule)
    if problems:
        raise RulesError(problems)
    return RuleSet(Path(path), str(mode), tuple(rules))


def _check_rule(
    index: int, raw: dict[str, Any], lines: _Lines, problem: Callable[[int, str], None]
) -> Rule | None:
    at = lines.of_rule(index)
    ok = True

    def bad(key: str, message: str) -> None:
        nonlocal ok
        ok = False
        problem(lines.of_key(index, key), message)

    for key in raw:
        if key not in RULE_KEYS:
            bad(key, f"unknown key {key!r} in a rule; a rule has {', '.join(RULE_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        bad("name", "every rule needs a name: letters, digits, '.', '_' and '-', at most 64")
        name = f"rule-{index + 1}"
    match = raw.get("match", {})
    if not isinstance(match, dict):
        bad("match", "[rule.match] must be a table of conditions")
        match = {}
    checked: dict[str, Any] = {}
    for key, value in match.items():
        message = _check_condition(key, value)
        if message:
            bad(key, message)
        else:
            checked[key] = value if key in RANGE_FIELDS or isinstance(value, list) else [value]
    if checked.get("min_confidence", 0.0) > checked.get("max_confidence", 1.0):
        bad("min_confidence", "min_confidence is above max_confidence: the rule can never match")
    actions: list[Action] = []
    checkers: tuple[tuple[str, Callable[[Any, Callable[[str, str], None]], Action | None]], ...] = (
        ("file", _check_file),
        ("forward", _check_forward),
        ("notify", _check_notify),
        ("orthanc", _check_orthanc),
    )
    for kind, checker in checkers:
        if kind in raw:
            action = checker(raw[kind], bad)
            if action is not None:
                actions.append(action)
    if not actions and not any(key in raw for key in ACTIONS):
        bad(
            "name", f"rule {name!r} does nothing: add an action ({', '.join(f'[rule.{a}]' for a in ACTIONS)})"
        )
    return Rule(str(name), checked, tuple(actions), at) if ok else None


def _check_condition(key: str, value: Any) -> str | None:
    if key not in MATCH_FIELDS:
        return f"unknown condition {key!r}; conditions: {', '.join(MATCH_FIELDS)}"
    if key in RANGE_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            return f"{key} must be a number from 0 to 1"
        if math.isnan(value):
            return f"{key} must be a number from 0 to 1"
        return None
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v for v in values):
        return f"{key} must be a non-empty string or a list of them"
    if key in LABEL_FIELDS:
        unknown = [v for v in values if v not in Label.__members__]
        if unknown:
            return f"{key}: unknown label {unknown[0]!r}; labels: {', '.join(Label)}"
    if key in VERDICT_FIELDS:
        known = {v.value for v in Verdict}
        unknown = [v for v in values if v not in known]
        if unknown:
            return f"{key}: unknown verdict {unknown[0]!r}; verdicts: {', '.join(sorted(known))}"
    return None


class _Problems:
    """Reports the problems of one action table and counts them."""

    def __init__(self, bad: Callable[[str, str], None]) -> None:
        self.bad, self.n = bad, 0

    def __call__(self, key: str, message: str) -> None:
        self.n += 1
        self.bad(key, message)


def _action_table(
    raw: Any, bad: Callable[[str, str], None], table: str, keys: tuple[str, ...]
) -> _Problems | None:
    """A :class:`_Problems` for ``[rule.TABLE]`` with its unknown keys reported, or ``None`` (and
    the problem reported) when it is not a table."""
    if not isinstance(raw, dict):
        bad(table, f"[rule.{table}] must be a table with {', '.join(keys)}")
        return None
    fail = _Problems(bad)
    for key in raw:
        if key not in keys:
            fail(key, f"unknown key {key!r} in [rule.{table}]; it has {', '.join(keys)}")
    return fail


def _unset(text: str) -> str | None:
    """The first environment variable ``os.path.expandvars`` left in ``text`` (it was not set)."""
    found = re.search(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text)
    return found.group(1) if found else None


def _check_file(raw: Any, bad: Callable[[str, str], None]) -> FileAction | None:
    fail = _action_table(raw, bad, "file", ("to", "how"))
    if fail is None:
        return None
    how = raw.get("how", "copy")
    if how not in FILE_MODES:
        fail("how", f"how must be one of {', '.join(FILE_MODES)}")
    to = raw.get("to")
    if not isinstance(to, str) or not to:
        fail("to", "[rule.file] needs `to`, the target path template")
        return None
    expanded = os.path.expandvars(to)
    unset = _unset(expanded)
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(expanded) if f is not None}
    except ValueError as exc:
        fail("to", f"`to` is not a valid template: {exc}")
        return None
    unknown = sorted(fields - TEMPLATE_FIELDS)
    if unset:
        fail("to", f"environment variable {unset} is not set (it is used in `to`)")
    elif not os.path.isabs(expanded):
        fail("to", f"`to` must be an absolute path once expanded (it is {expanded!r})")
    if unknown:
        fail("to", f"`to` names {{{unknown[0]}}}; it may name {', '.join(sorted(TEMPLATE_FIELDS))}")
    elif "SOPInstanceUID" not in fields:
        fail("to", "`to` must name {SOPInstanceUID}, or two instances would compete for one file")
    return None if fail.n else FileAction(expanded, how)


_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII but backslash, 16 at most


def _check_forward(raw: Any, bad: Callable[[str, str], None]) -> ForwardAction | None:
    keys = ("ae_title", "host", "port", "calling_ae", "tls", "tls_ca", "tls_cert", "tls_key")
    fail = _action_table(raw, bad, "forward", keys)
    if fail is None:
        return None
    tls = raw.get("tls", False)
    if not isinstance(tls, bool):
        fail("tls", "tls must be true or false")
    files: dict[str, str | None] = {}
    for key in ("tls_ca", "tls_cert", "tls_key"):
        value = raw.get(key)
        files[key] = None if value is None else os.path.expandvars(str(value))
        if files[key] is not None and not tls:
            fail(key, f"{key} is set but tls is not: add tls = true")
        elif files[key] is not None and not os.path.isfile(str(files[key])):
            fail(key, f"{key}: no such file {files[key]!r}")
    if (files["tls_cert"] is None) != (files["tls_key"] is None):
        fail("tls_cert" if "tls_cert" in raw else "tls_key", "tls_cert and tls_key go together")
    values: dict[str, str] = {}
    for key in ("ae_title", "host", "port", "calling_ae"):
        value = raw.get(key, "DICOM_SORTER" if key == "calling_ae" else None)
        if value is None:
            fail(key if key in raw else "forward", f"[rule.forward] needs {key}")
            continue
        text = os.path.expandvars(str(value)).strip()
        unset = _unset(text)
        if unset:
            fail(key, f"environment variable {unset} is not set (it is used in {key})")
            continue
        values[key] = text
    for key in ("ae_title", "calling_ae"):
        if key in values and not _AE_TITLE.match(values[key]):
            fail(key, f"{key} must be 1 to 16 printable ASCII characters without a backslash")
    port = values.get("port", "")
    if "port" in values and not (port.isdigit() and 0 < int(port) < 65536):
        fail("port", f"port must be a number from 1 to 65535 (it is {port!r})")
    if fail.n or len(values) < 4:
        return None
    action = ForwardAction(
        values["ae_title"],
        values["host"],
        int(port),
        values["calling_ae"],
        tls is True,
        files["tls_ca"],
        files["tls_cert"],
        files["tls_key"],
    )
    try:  # a key that does not match, files the wrong way round: said here, not at every send
        action.tls_context()
    except ConfigError as exc:
        fail("tls_ca" if str(exc).startswith("cannot use tls_ca") else "tls_cert", str(exc))
        return None
    return action


def _check_notify(raw: Any, bad: Callable[[str, str], None]) -> NotifyAction | None:
    fail = _action_table(raw, bad, "notify", ("url", "quiet_s"))
    if fail is None:
        return None
    url, quiet = _check_url(raw, fail, "notify"), _check_quiet(raw, fail)
    if fail.n or url is None or quiet is None:
        return None
    return NotifyAction(url, quiet)


def _check_url(raw: dict[str, Any], bad: Callable[[str, str], None], table: str) -> str | None:
    url = os.path.expandvars(str(raw.get("url", ""))).strip()
    unset = _unset(url)
    if unset:
        bad("url", f"environment variable {unset} is not set (it is used in url)")
        return None
    if not re.match(r"^https?://[^/\s]+", url):
        bad("url" if "url" in raw else table, f"[rule.{table}] needs url, an http:// or https:// address")
        return None
    return url


def _check_quiet(raw: dict[str, Any], bad: Callable[[str, str], None]) -> float | None:
    quiet = raw.get("quiet_s", 60)
    if isinstance(quiet, bool) or not isinstance(quiet, int | float) or not 0 <= quiet <= 86400:
        bad("quiet_s", "quiet_s must be seconds from 0 to 86400 (a series is complete once quiet that long)")
        return None
    return float(quiet)


def _check_orthanc(raw: Any, bad: Callable[[str, str], None]) -> OrthancAction | None:
    fail = _action_table(raw, bad, "orthanc", ("url", "metadata", "quiet_s"))
    if fail is None:
        return None
    metadata = raw.get("metadata", "SorterVerdict")
    if not isinstance(metadata, str) or not re.match(r"^[A-Za-z][A-Za-z0-9_]{0,63}$", metadata):
        fail("metadata", "metadata must be the name of an Orthanc UserMetadata entry (letters, digits, _)")
    url, quiet = _check_url(raw, fail, "orthanc"), _check_quiet(raw, fail)
    if fail.n or url is None or quiet is None:
        return None
    return OrthancAction(url, str(metadata), quiet)
