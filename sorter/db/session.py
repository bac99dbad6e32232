"""Engine and session factory, and the schema's migration state.

One engine per process (a composition root creates it and passes the session
factory down). SQLite gets WAL mode, a busy timeout and foreign keys; the
embedded default database is migrated on first use, a PostgreSQL database
when it is still empty. A PostgreSQL database at an older revision is left
alone: upgrading a shared production schema is a deliberate step
(``sorter db upgrade``), never a side effect of starting a worker.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from sorter.errors import SorterError
from sorter.interrupts import InterruptSafeSession

log = logging.getLogger(__name__)

#: The Alembic script directory ships inside the package, so migrations work
#: from an editable checkout and from an installed wheel alike.
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
#: How long a SQLite writer waits for another writer before giving up.
SQLITE_BUSY_TIMEOUT_MS = 30_000


class DatabaseError(SorterError):
    """The database cannot be used as it is (wrong revision, unreachable)."""

    reason = "database_error"


def normalise_url(url: str) -> str:
    """Return ``url`` with the psycopg 3 driver for PostgreSQL URLs.

    ``postgresql://`` and ``postgres://`` (as libpq, Heroku and most tools
    write them) would otherwise select psycopg2, which is not a dependency.
    """
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def sqlite_file(url: str | URL) -> Path | None:
    """The absolute path of the file a SQLite ``url`` names; ``None`` for an in-memory
    database, another backend, or a string that is no URL (:func:`create_db_engine` says so)."""
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    database = parsed.database
    if parsed.query.get("uri") == "true" and database.startswith("file:"):
        # A URI filename (sqlite:///file:/path/results.db?mode=ro&uri=true, read-only): its path.
        if parsed.query.get("mode") == "memory":
            return None
        database = urllib.parse.unquote(urllib.parse.urlsplit(database).path)
    return Path(os.path.abspath(database))


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers (reports, the claim SELECT) run while a batch writes;
    # the busy timeout makes a second writer wait instead of failing at once.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint; safe with WAL
    cursor.close()


def create_db_engine(url: str) -> Engine:
    """Create the process's engine for ``url``.

    Parameters
    ----------
    url
        A SQLAlchemy URL; ``postgresql://`` is rewritten to use psycopg 3.

    Returns
    -------
    sqlalchemy.engine.Engine
        SQLite: WAL journal, busy timeout, foreign keys on. PostgreSQL:
        connections are pinged before use so that a restarted server does
        not fail the next batch, and statements are planned afresh each time.
    """
    try:
        return _create_engine(normalise_url(url))
    except sa.exc.ArgumentError as exc:
        raise DatabaseError(
            f"{url!r} is not a database URL: {exc}; use sqlite:///FILE or postgresql://USER@HOST/DB"
        ) from exc
    except (ImportError, sa.exc.NoSuchModuleError) as exc:
        backend = make_url(normalise_url(url)).get_backend_name()
        hint = "pip install 'dicom-sorter[postgres]'" if backend == "postgresql" else "install its driver"
        raise DatabaseError(
            f"cannot use {make_url(url).render_as_string()}: the {backend} driver is not installed "
            f"({exc}); {hint}"
        ) from exc


def _create_engine(url: str) -> Engine:
    if make_url(url).get_backend_name() == "sqlite":
        engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # No server-side prepared statements: psycopg prepares a statement after five
    # runs, and PostgreSQL may then keep a generic plan made while the tables were
    # small (a sequential scan) for the life of the connection. Measured: the UID
    # lookup of a scan slowed from 0.05 s to 7 s per 5 000 files between 10 000
    # and 40 000 instances. Planning each statement costs well under a millisecond.
    return sa.create_engine(url, pool_pre_ping=True, connect_args={"prepare_threshold": None})


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to ``engine``; objects stay readable after commit, and a Ctrl-C never
    lands inside a commit (:class:`~sorter.interrupts.InterruptSafeSession`)."""
    return sessionmaker(bind=engine, expire_on_commit=False, class_=InterruptSafeSession)


def alembic_config(engine: Engine | None = None) -> Config:
    """An Alembic configuration pointing at the packaged migrations.

    No ``alembic.ini`` is needed at run time; the engine travels in
    ``config.attributes`` and ``migrations/env.py`` uses it.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is not None:
        config.attributes["engine"] = engine
    return config


def head_revision() -> str:
    """The newest revision the packaged migrations know."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise DatabaseError("the packaged migrations have no head revision")
    return head


def current_revision(engine: Engine) -> str | None:
    """The database's revision, or ``None`` for a database never migrated."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def known_revision(revision: str) -> bool:
    """Whether the packaged migrations hold ``revision``."""
    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to ``revision``.

    Raises
    ------
    DatabaseError
        A migration found its table already there: the database records an older revision than
        its tables are at (a ``sorter db stamp`` by hand, or another database's alembic_version).
    """
    current = current_revision(engine)
    try:
        command.upgrade(alembic_config(engine), revision)
    except sa.exc.DBAPIError as exc:
        if current is None or "already exists" not in str(exc.orig or exc):
            raise
        raise DatabaseError(
            f"migrating the database from revision {current} failed: {database_problem(exc)}; its "
            "tables are newer than the revision it records (a `sorter db stamp` by hand?): stamp "
            "the revision they are at (`sorter db history`)"
        ) from exc


def downgrade(engine: Engine, revision: str) -> None:
    """Revert migrations down to ``revision`` (``base``: no tables left)."""
    command.downgrade(alembic_config(engine), revision)


def stamp(engine: Engine, revision: str) -> None:
    """Record ``revision`` as the database's revision without running migrations."""
    command.stamp(alembic_config(engine), revision)


def revisions() -> list[tuple[str, str | None, str]]:
    """``(revision, down_revision, first line of its message)`` of each packaged migration, newest first."""
    out = []
    for script in ScriptDirectory.from_config(alembic_config()).walk_revisions():
        down = script.down_revision
        after = down if isinstance(down, str) or down is None else ",".join(down)
        doc = (script.doc or "").strip().splitlines()
        out.append((script.revision, after, doc[0] if doc else ""))
    return out


def check(engine: Engine) -> None:
    """Fail when the models and the migrations disagree (``alembic check``).

    Raises
    ------
    alembic.util.exc.CommandError
        The database is not at head, or autogenerate finds a difference
        between ``sorter.db.models`` and the migrated schema.
    """
    command.check(alembic_config(engine))


def is_sqlite(engine: Engine) -> bool:
    """True for the embedded SQLite database."""
    return engine.dialect.name == "sqlite"


def extension_tables(engine: Engine) -> set[str]:
    """Tables of the current schema that a PostgreSQL extension owns (PostGIS's
    ``spatial_ref_sys``, in every database made from a template that has PostGIS): part of the
    database's setup, not another application's data. None on SQLite."""
    if is_sqlite(engine):
        return set()
    owned = sa.text(
        "SELECT c.relname FROM pg_depend d JOIN pg_class c ON c.oid = d.objid"
        " WHERE d.classid = 'pg_class'::regclass AND d.deptype = 'e'"
        " AND c.relnamespace = current_schema()::regnamespace"
    )
    with engine.connect() as connection:
        return set(connection.execute(owned).scalars())


def ensure_schema(engine: Engine, migrate_new: bool = True) -> None:
    """Migrate SQLite and empty databases to head; refuse an outdated PostgreSQL schema.

    ``migrate_new=False`` (a command that only reads results) refuses a database without the
    schema instead of creating it: pointed at the wrong database, ``sorter status`` created
    dicom-sorter's tables there and reported zeros.

    Raises
    ------
    DatabaseError
        A PostgreSQL database at an older (or unknown) revision; a database without the schema
        that holds other tables (another application's: never filled with ours on the side), or,
        with ``migrate_new=False``, any database without the schema.
    """
    current, head = current_revision(engine), head_revision()
    if current == head:
        return
    if current is not None and not known_revision(current):
        raise DatabaseError(
            f"the database is at revision {current}, which this sorter does not know (its newest is "
            f"{head}): it was migrated by a newer dicom-sorter or is another application's; upgrade "
            "dicom-sorter, or point --database-url at another database"
        )
    if current is None:
        where = describe_database(engine.url.render_as_string(hide_password=False))
        where = where if where.startswith("SQLite") else f"the database {where}"
        ours = ("alembic_version",)  # left empty by `sorter db downgrade base`
        tables = set(sa.inspect(engine).get_table_names()) - extension_tables(engine)
        others = sorted(t for t in tables if t not in ours and not t.startswith("sqlite_"))
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise DatabaseError(
                f"{where} holds tables ({shown}) but no dicom-sorter schema: it is another "
                "application's; point --database-url / SORTER_DATABASE_URL at an empty database or at "
                "a dicom-sorter one (`sorter db upgrade` adds ours to it on purpose)"
            )
        if not migrate_new:
            raise DatabaseError(
                f"{where} holds no dicom-sorter results yet: `sorter scan PATH` (or listen, watch, "
                "or `sorter db upgrade`) creates them; or point --database-url / SORTER_DATABASE_URL "
                "at the one they wrote"
            )
    if is_sqlite(engine) or current is None:
        log.info("migrating %s database from %s to %s", engine.dialect.name, current, head)
        upgrade(engine)
        return
    raise DatabaseError(
        f"the database is at revision {current} and this sorter needs {head}: run `sorter db upgrade`"
    )


#: What SQLite's terse messages mean for the one who runs the command.
_SQLITE_HINTS = (
    ("unable to open database file", "its folder must exist and be writable (SQLite writes FILE-wal there)"),
    ("readonly database", "the file or its folder is read-only (SQLite writes FILE-wal there)"),
    ("file is not a database", "point --database-url at a results database, or at a new file name"),
    ("database or disk is full", "free space on the disk that holds it"),
    ("disk i/o error", "the disk or file system that holds it failed a read or write"),
    ("database is locked", f"another process held it locked for over {SQLITE_BUSY_TIMEOUT_MS // 1000} s"),
)


#: PostgreSQL's SQLSTATE for a role that lacks a privilege (``permission denied for table ...``).
INSUFFICIENT_PRIVILEGE = "42501"
#: ... and for a table that is not there (a database without the schema, or another one's).
UNDEFINED_TABLE = "42P01"
#: What to do about it: every command but the queries writes (see README, "PostgreSQL roles").
PRIVILEGE_HINT = (
    "this role may not do that: commands that write (scan, listen, watch, worker, serve, rules, "
    "reclassify, models use, adapt) need SELECT, INSERT, UPDATE and DELETE on dicom-sorter's tables "
    "and USAGE on their sequences; report, find, discrepancies, failures, status and export need "
    "SELECT (README: PostgreSQL roles)"
)


def sqlstate(exc: sa.exc.DBAPIError) -> str | None:
    """PostgreSQL's SQLSTATE of a driver error (psycopg's ``sqlstate``); ``None`` for SQLite's."""
    return getattr(exc.orig, "sqlstate", None)


def database_problem(exc: sa.exc.DBAPIError) -> str:
    """The driver's own words on one line (psycopg's come on several, and SQLAlchemy's text adds
    the SQL and a web link), with what to do where the words leave it unsaid (SQLite's, and a
    PostgreSQL role without a privilege)."""
    problem = "; ".join(line.strip() for line in str(exc.orig or exc).splitlines() if line.strip())
    lowered = problem.lower()
    hint = next((hint for words, hint in _SQLITE_HINTS if words in lowered), None)
    if sqlstate(exc) == INSUFFICIENT_PRIVILEGE:
        hint = PRIVILEGE_HINT
    return f"{problem}; {hint}" if hint else problem


def open_database(url: str, migrate_new: bool = True) -> tuple[Engine, sessionmaker[Session]]:
    """Engine and session factory for ``url``, with the schema ready to use.

    Parameters
    ----------
    url
        Database URL (``Settings.database_url``).
    migrate_new
        Create the schema in an empty database (else refuse it: :func:`ensure_schema`).

    Returns
    -------
    tuple
        ``(engine, session_factory)``; the caller disposes of the engine.
    """
    engine = create_db_engine(url)  # a missing driver or a malformed URL raises DatabaseError
    try:
        ensure_schema(engine, migrate_new)
    except sa.exc.DBAPIError as exc:  # the server or file cannot be reached, or is no database
        engine.dispose()
        raise DatabaseError(
            f"cannot open the database {make_url(url).render_as_string()}: {database_problem(exc)}"
        ) from exc
    except BaseException:
        engine.dispose()
        raise
    return engine, make_session_factory(engine)


def describe_database(url: str) -> str:
    """A database URL for messages: its password hidden, a SQLite file as an absolute path (the
    default ``sqlite:///sorter.db`` is another file in each working directory)."""
    path = sqlite_file(url)
    if path is not None:
        return f"SQLite file {path}"
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "an unparseable URL"
