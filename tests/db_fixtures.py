"""Pytest fixtures for the database, scan and report tests (loaded with ``pytest_plugins``).

PostgreSQL: one throwaway database per test session, created through an
autocommit connection to ``test`` on 127.0.0.1:5432 (``SORTER_TEST_POSTGRES_URL``
overrides) and dropped at the end; each test truncates it before use. Tests skip
with a clear message when the server is unreachable, unless
``SORTER_TEST_REQUIRE_POSTGRES=1`` (set it in CI), where they fail instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from db_support import ADMIN_URL, make_tiny_model, truncate

from sorter.db.session import create_db_engine, upgrade


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny.pt", seed=1)


@pytest.fixture(scope="session")
def tiny_model_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model-b") / "tiny-b.pt", seed=2)


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """URL of a migrated throwaway PostgreSQL database for this test session."""
    admin = create_db_engine(ADMIN_URL).execution_options(isolation_level="AUTOCOMMIT")
    name = f"sorter_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        message = f"PostgreSQL unreachable at {ADMIN_URL} ({type(exc).__name__}); PostgreSQL tests skipped"
        if os.environ.get("SORTER_TEST_REQUIRE_POSTGRES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    url = sa.make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    engine = create_db_engine(url)
    upgrade(engine)
    engine.dispose()
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind: a fresh SQLite file, or the session's PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sorter.db'}"
    url: str = request.getfixturevalue("postgres_database")
    truncate(url)
    return url


@pytest.fixture()
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'sorter.db'}"
