"""The files in deploy/ say only what sorter can do (issue 13, "Deploy that works as written"):
they parse, every `sorter` command and option they run exists, every SORTER_ variable they set is
read by sorter, every metric an alert rule names is exported, and systemd accepts the units where
systemd-analyze is installed."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from sorter.cli import main
from sorter.config import Settings
from sorter.metrics import ListenerMetrics, Metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
#: Read by the deploy files themselves, not by sorter.
OWN_VARIABLES = {"SORTER_DICOM_PORT"}


def _commands(
    group: click.Group = main, prefix: tuple[str, ...] = ()
) -> dict[tuple[str, ...], click.Command]:
    out: dict[tuple[str, ...], click.Command] = {}
    for name, command in group.commands.items():
        out[(*prefix, name)] = command
        if isinstance(command, click.Group):
            out |= _commands(command, (*prefix, name))
    return out


COMMANDS = _commands()


def _variables() -> set[str]:
    names = {f"SORTER_{f.name.upper()}" for f in dataclasses.fields(Settings)}
    for command in [main, *COMMANDS.values()]:
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            names |= {envvar} if isinstance(envvar, str) else set(envvar or ())
    return names


def _check_sorter_argv(argv: list[str], where: str) -> None:
    """``sorter CMD [SUB] --opt ...``: the command exists and takes every option given."""
    words = argv[1:]
    key: tuple[str, ...] = ()
    while words and (*key, words[0]) in COMMANDS:
        key = (*key, words.pop(0))
    assert key, f"{where}: `{shlex.join(argv)}` names no sorter command"
    command = COMMANDS[key]
    options = {opt for p in command.params for opt in [*p.opts, *p.secondary_opts]} | {"--help"}
    for word in words:
        if word.startswith("--"):
            assert word.split("=")[0] in options, f"{where}: `sorter {' '.join(key)}` has no {word}"


def _sorter_lines(text: str) -> list[list[str]]:
    found = []
    for line in text.splitlines():
        # In command position: a line's first word (after VAR=value assignments, sudo -u user,
        # ExecStart=), by itself or as a path ending in /sorter.
        match = re.match(
            r"\s*(?:ExecStart=)?(?:sudo -u \S+ )?(?:[A-Z_]+=\S+\s+)*(?:\S*/)?sorter\s+(\w[^#`;|&]*)", line
        )
        if match and not line.lstrip().startswith("#"):
            rest = match.group(1).replace("%f", "X").replace("%i", "0")
            try:
                words = shlex.split(rest)
            except ValueError:  # a quote closed on another line: the words before it are enough
                words = rest.split()
            found.append(["sorter", *words])
    return found


def _shell_blocks(markdown: str) -> list[str]:
    """The bodies of the fenced blocks marked bash, sh or nothing."""
    blocks, current, shell = [], [], False
    inside = False
    for line in markdown.splitlines():
        fence = re.match(r"\s*```(\w*)", line)
        if fence and not inside:
            inside, shell, current = True, fence.group(1) in ("", "bash", "sh", "console"), []
        elif fence and inside:
            inside = False
            if shell:
                blocks.append("\n".join(current))
        elif inside:
            current.append(line)
    return blocks


def test_every_yaml_and_json_file_parses():
    for path in [*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")]:
        assert yaml.safe_load(path.read_text()) is not None, path
    for path in DEPLOY.rglob("*.json"):
        json.loads(path.read_text())


def test_compose_runs_only_existing_commands_and_variables():
    compose: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    known = _variables() | OWN_VARIABLES
    for name, service in compose["services"].items():
        command = service.get("command")
        if isinstance(command, list) and command and command[0] == "sorter":
            _check_sorter_argv(command, f"compose service {name}")
        environment = service.get("environment") or {}
        for variable in environment if isinstance(environment, dict) else []:
            if variable.startswith("SORTER_"):
                assert variable in known, f"compose service {name} sets {variable}, which sorter never reads"


def test_systemd_units_and_env_file_name_existing_commands_and_variables():
    known = _variables() | OWN_VARIABLES
    texts = {p: p.read_text() for p in [*(DEPLOY / "systemd").glob("*.service"), DEPLOY / "sorter.env"]}
    for path, text in texts.items():
        for argv in _sorter_lines(text):
            if path.suffix == ".service":
                _check_sorter_argv(argv, path.name)
        for variable in set(re.findall(r"\bSORTER_[A-Z_]+[A-Z]\b", text)):
            assert variable in known, f"{path.name} names {variable}, which sorter never reads"
    worker = (DEPLOY / "systemd" / "sorter-worker@.service").read_text()
    assert not re.search(r"^Environment=SORTER_DEVICE=cuda", worker, re.M), "the unit must not force a GPU"


def test_readmes_run_only_existing_commands():
    for path in (DEPLOY / "README.md", DEPLOY.parent / "README.md"):
        for block in _shell_blocks(path.read_text()):
            for argv in _sorter_lines(block.replace("\\\n", " ")):
                if "..." in argv or any(w.startswith(("$", "<")) for w in argv[1:2]):
                    continue
                _check_sorter_argv(argv, path.name)


def test_alert_rules_name_only_metrics_sorter_exports(tmp_path):
    metrics = Metrics()
    ListenerMetrics(metrics, tmp_path)
    exported = {s.name for family in metrics.registry.collect() for s in family.samples}
    for family in metrics.registry.collect():  # a labelled counter has no sample before its first use
        exported |= {family.name, f"{family.name}_total" if family.type == "counter" else family.name}
    rules = yaml.safe_load((DEPLOY / "prometheus" / "sorter-alerts.yml").read_text())
    named = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert {"alert", "expr", "labels", "annotations"} <= set(rule), rule
            named |= set(re.findall(r"\bsorter_[a-z_]+", rule["expr"]))
    assert named and named <= exported, named - exported


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_units(tmp_path):
    for unit in (DEPLOY / "systemd").glob("*.service"):
        text = unit.read_text().replace("/opt/sorter/venv/bin/sorter", shutil.which("true") or "/bin/true")
        name = unit.name.replace("@.service", "@test.service")
        (tmp_path / name).write_text(text)
        done = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(tmp_path / name)], capture_output=True, text=True
        )
        problems = [
            line
            for line in done.stderr.splitlines()
            if (unit.stem.split("@")[0] in line and "Unknown" in line) or "Invalid" in line
        ]
        assert not problems, done.stderr


def _github_anchor(title: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def test_the_readme_contents_list_every_section_in_order():
    text = (DEPLOY.parent / "README.md").read_text()
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # headings only outside code blocks
    headings = [
        (len(level), title)
        for level, title in re.findall(r"^(##|###) (.+)$", prose, re.M)
        if title != "Contents"
    ]
    contents = text.split("## Contents\n", 1)[1].split("\n## ", 1)[0]
    listed = [
        (len(indent) // 2 + 2, name, target)
        for indent, name, target in re.findall(r"^( *)- \[(.+)\]\(#(.+)\)$", contents, re.M)
    ]
    assert [(level, name) for level, name, _ in listed] == [
        (level, t.replace("`", "")) for level, t in headings
    ]
    assert [target for _, _, target in listed] == [_github_anchor(t) for _, t in headings]
