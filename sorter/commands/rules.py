"""``sorter rules``: check a rules file, explain what it does to one instance, apply it."""

from __future__ import annotations

from pathlib import Path

import click
import sqlalchemy as sa

from sorter.commands.common import database, database_option, format_option, write_rows
from sorter.commands.runs import progress_bar
from sorter.db.models import Instance, RuleAction
from sorter.db.queries import as_utc
from sorter.rules.engine import apply_rules, classified_count, facts_for, why_not
from sorter.rules.spec import RulesError, RuleSet, load_rules

RULES_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def read_rules(path: Path) -> RuleSet:
    """``path`` as a :class:`RuleSet`, or every problem on its own line and exit status 2."""
    try:
        return load_rules(path)
    except RulesError as exc:
        for problem in exc.problems:
            click.echo(f"error: {problem}", err=True)
        raise click.exceptions.Exit(2) from exc


def _check_rules(_ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
    if value is not None:
        read_rules(value)
    return value


#: ``--apply-rules FILE`` (``SORTER_RULES``) of the commands that classify: checked at start (a
#: service never runs without the rules it was given), applied after each committed batch.
rules_option = click.option(
    "--apply-rules",
    "rules",
    type=RULES_FILE,
    envvar="SORTER_RULES",
    show_envvar=True,
    callback=_check_rules,
    help='Apply this rules file to what is classified, after each batch (README "Rules"; '
    "`sorter rules check FILE` first).",
)


@click.group("rules")
def rules_group() -> None:
    """Rules that file instances by what the pixels show (see README "Rules")."""


@rules_group.command("check")
@click.argument("file", type=RULES_FILE)
def check(file: Path) -> None:
    """Check FILE: every problem with its line, exit status 2 when there is one."""
    rules = read_rules(file)
    click.echo(f"{file}: {len(rules.rules)} rules, mode {rules.mode}: ok")
    for rule in rules.rules:
        conditions = ", ".join(f"{k}={v}" for k, v in rule.match.items()) or "every classified instance"
        actions = "; ".join(f"{a.kind} ({a.how}) to {a.to}" for a in rule.actions)
        click.echo(f"  {rule.name} (line {rule.line}): when {conditions}: {actions}")


@rules_group.command("explain")
@click.argument("instance")
@click.option("--rules", "rules_file", required=True, type=RULES_FILE, help="The rules file.")
@database_option
def explain(instance: str, rules_file: Path, database_url: str | None) -> None:
    """What each rule of --rules does to INSTANCE (a SOP Instance UID or an instance id), and why."""
    rules = read_rules(rules_file)
    with database(database_url) as (_engine, sessions), sessions() as session:
        column = Instance.id if instance.isdigit() else Instance.sop_instance_uid
        found = session.scalars(
            sa.select(Instance).where(column == (int(instance) if instance.isdigit() else instance))
        )
        record = found.first()
        if record is None:
            raise click.ClickException(f"no instance {instance} in this database")
        facts = facts_for(session, [record.id]).get(record.id)
        ledger = {
            (row.rule, row.action): row
            for row in session.scalars(sa.select(RuleAction).where(RuleAction.instance_id == record.id))
        }
    if facts is None:
        raise click.ClickException(
            f"instance {record.sop_instance_uid} is {record.status}, not classified: no rule applies"
        )
    click.echo(
        f"instance {record.sop_instance_uid}: {facts['label']} at {facts['confidence']:.3f}, header "
        f"{facts['header_label'] or 'none'}, verdict {facts['verdict']}, series {facts['series_verdict']}, "
        f"study {facts['study_verdict']}"
    )
    acting = True
    for rule in rules.rules:
        reason = why_not(rule, facts)
        if reason is not None:
            click.echo(f"  {rule.name}: no match: {reason}")
            continue
        if not acting:
            click.echo(f"  {rule.name}: matches, but mode is first and an earlier rule acts")
            continue
        acting = rules.mode == "all"
        for action in rule.actions:
            entry = ledger.get((rule.name, action.kind))
            state = (
                "not yet" if entry is None else entry.status + (f" ({entry.error})" if entry.error else "")
            )
            if entry is not None and entry.status == "failed" and entry.next_attempt_at is not None:
                state += f", next try {as_utc(entry.next_attempt_at):%Y-%m-%d %H:%M:%S} UTC"
            click.echo(
                f"  {rule.name}: matches: {action.kind} ({action.how}) to {action.target(facts)}: {state}"
            )


@rules_group.command("apply")
@click.argument("file", type=RULES_FILE)
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--retry-now",
    is_flag=True,
    help="Send failed forwards now, without waiting for their backoff, and dead-lettered ones once more.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    envvar="SORTER_PROGRESS",
    help="Progress bar over the instances checked (default: when stderr is a terminal).",
)
@database_option
def apply(
    file: Path, paths: tuple[Path, ...], retry_now: bool, progress: bool | None, database_url: str | None
) -> None:
    """Apply FILE to the classified instances (under PATHS, or all) and send the forwards that are
    due; what a rule did already is skipped, what failed is tried again. Run it from cron to keep
    retrying a destination that was down. Exit status 3 when an action failed."""
    rules = read_rules(file)
    with database(database_url) as (_engine, sessions):
        # A million instances take a minute or more: say how far it is (the total only without
        # PATHS, where one count over the status index gives it).
        bar = progress_bar(progress, "rules", unit="instance")
        try:
            if bar is not None and not paths:
                with sessions() as session:
                    bar.total = classified_count(session)
            report = apply_rules(
                sessions,
                rules,
                under=[str(p) for p in paths],
                retry_now=retry_now,
                on_chunk=None if bar is None else bar.update,
            )
        finally:
            if bar is not None:
                bar.close()
    click.echo(report.line())
    if sum(report.failed.values()) + sum(report.dead.values()):
        click.echo("some actions failed: `sorter rules failed` lists them and why", err=True)
        raise click.exceptions.Exit(3)


#: Columns of `sorter rules failed`.
FAILED_COLUMNS = (
    "rule",
    "action",
    "status",
    "error",
    "attempts",
    "next_try",
    "sop_instance_uid",
    "target",
    "detail",
)


@rules_group.command("failed")
@format_option
@database_option
def failed(fmt: str, database_url: str | None) -> None:
    """Rule actions that failed (tried again) or were dead-lettered, with the reason and next try;
    `sorter rules apply --retry-now FILE` sends them again."""
    with database(database_url) as (_engine, sessions), sessions() as session:
        rows = [
            {
                "rule": action.rule,
                "action": action.action,
                "status": action.status,
                "error": action.error,
                "attempts": action.attempts,
                "next_try": as_utc(action.next_attempt_at).isoformat(timespec="seconds")
                if action.status == "failed" and action.next_attempt_at is not None
                else "",
                "sop_instance_uid": uid,
                "target": action.target,
                "detail": action.detail,
            }
            for action, uid in session.execute(
                sa.select(RuleAction, Instance.sop_instance_uid)
                .join(Instance, Instance.id == RuleAction.instance_id)
                .where(RuleAction.status.in_(["failed", "dead"]))
                .order_by(RuleAction.status, RuleAction.rule, RuleAction.id)
            )
        ]
    write_rows(rows, FAILED_COLUMNS, fmt)
    if fmt == "table" and not rows:
        click.echo("no rule action has failed", err=True)
