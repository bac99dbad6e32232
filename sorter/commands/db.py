"""``sorter db``: migrate the results database and check models against migrations."""

from __future__ import annotations

import click
from alembic.util.exc import CommandError

from sorter.commands.common import database_option
from sorter.config import Settings
from sorter.db import session as db


@click.group("db")
def db_group() -> None:
    """Manage the results database schema (Alembic migrations shipped with sorter)."""


@db_group.command()
@click.argument("revision", default="head")
@database_option
def upgrade(revision: str, database_url: str | None) -> None:
    """Apply migrations up to REVISION (default: head)."""
    engine = db.create_db_engine(Settings.from_env(database_url=database_url).database_url)
    try:
        db.upgrade(engine, revision)
        click.echo(f"database at revision {db.current_revision(engine)}")
    finally:
        engine.dispose()


@db_group.command()
@database_option
def check(database_url: str | None) -> None:
    """Fail unless the database is at head and the models match the migrations."""
    engine = db.create_db_engine(Settings.from_env(database_url=database_url).database_url)
    try:
        db.check(engine)
    except CommandError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        engine.dispose()
    click.echo("models and migrations agree")


@db_group.command()
@database_option
def current(database_url: str | None) -> None:
    """Print the database's revision and the newest one this sorter knows."""
    engine = db.create_db_engine(Settings.from_env(database_url=database_url).database_url)
    try:
        click.echo(f"current {db.current_revision(engine) or '(empty)'}, head {db.head_revision()}")
    finally:
        engine.dispose()
