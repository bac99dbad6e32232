"""``sorter db``: migrate the results database and check models against migrations."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click
from alembic.util.exc import CommandError
from sqlalchemy.engine import Engine

from sorter.commands.common import database_option
from sorter.config import Settings
from sorter.db import session as db


@contextmanager
def _engine(database_url: str | None) -> Iterator[Engine]:
    """The configured database's engine; Alembic's and our errors become one line and status 1
    (a database error, as under every command: :class:`sorter.commands.oneline.OneLineErrors`)."""
    try:
        engine = db.create_db_engine(Settings.from_env(database_url=database_url).database_url)
    except db.DatabaseError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        yield engine
    except CommandError as exc:
        raise click.ClickException(
            f"{str(exc).rstrip('.')}; `sorter db history` lists the revisions"
        ) from exc
    finally:
        engine.dispose()


@click.group("db")
def db_group() -> None:
    """Manage the results database schema (Alembic migrations shipped with sorter)."""


@db_group.command()
@click.argument("revision", default="head")
@database_option
def upgrade(revision: str, database_url: str | None) -> None:
    """Apply migrations up to REVISION (default: head)."""
    with _engine(database_url) as engine:
        db.upgrade(engine, revision)
        click.echo(f"database at revision {db.current_revision(engine)}")


@db_group.command()
@click.argument("revision")
@database_option
def downgrade(revision: str, database_url: str | None) -> None:
    """Revert migrations down to REVISION (`base`: drop every table; back up first)."""
    with _engine(database_url) as engine:
        db.downgrade(engine, revision)
        click.echo(f"database at revision {db.current_revision(engine) or '(empty)'}")


@db_group.command()
@click.argument("revision")
@database_option
def stamp(revision: str, database_url: str | None) -> None:
    """Record REVISION as the database's revision without running any migration."""
    with _engine(database_url) as engine:
        db.stamp(engine, revision)
        click.echo(f"database stamped at revision {db.current_revision(engine) or '(empty)'}")


@db_group.command()
def history() -> None:
    """List the packaged migrations, newest first (no database needed)."""
    for revision, down, doc in db.revisions():
        click.echo(f"{revision}  (after {down or 'base'})  {doc}")


@db_group.command()
@database_option
def check(database_url: str | None) -> None:
    """Fail unless the database is at head and the models match the migrations."""
    with _engine(database_url) as engine:
        current, head = db.current_revision(engine), db.head_revision()
        if current != head:  # Alembic says only "Target database is not up to date."
            raise click.ClickException(
                f"the database is at revision {current or '(empty)'}, this sorter's migrations at "
                f"{head}: run `sorter db upgrade`"
            )
        db.check(engine)
    click.echo("models and migrations agree")


@db_group.command()
@database_option
def current(database_url: str | None) -> None:
    """Print the database's revision and the newest one this sorter knows."""
    with _engine(database_url) as engine:
        click.echo(f"current {db.current_revision(engine) or '(empty)'}, head {db.head_revision()}")
