"""Migrations on SQLite and PostgreSQL: they apply, round-trip, match the models, and name everything."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from db_support import query, sorter
from pydicom.data import get_testdata_file

import sorter.db.session as db_session
from sorter.cli import main
from sorter.db.models import Base, Instance
from sorter.db.session import (
    DatabaseError,
    alembic_config,
    create_db_engine,
    current_revision,
    ensure_schema,
    head_revision,
    normalise_url,
    open_database,
)
from sorter.domain import Status

pytest_plugins = ["db_fixtures"]
VIEWS = {"latest_predictions", "discrepancies", "series_summary", "series_discrepancies", "study_summary"}


def test_migrations_reach_head_and_match_the_models(db_url):
    sorter("db", "upgrade", url=db_url)
    assert "models and migrations agree" in sorter("db", "check", url=db_url).output
    assert f"current {head_revision()}" in sorter("db", "current", url=db_url).output
    engine = create_db_engine(db_url)
    inspector = sa.inspect(engine)
    assert set(Base.metadata.tables) <= set(inspector.get_table_names())
    assert set(inspector.get_view_names()) >= VIEWS
    engine.dispose()


def test_downgrade_to_nothing_and_back(db_url):
    from alembic import command

    engine = create_db_engine(db_url)
    command.downgrade(alembic_config(engine), "base")
    assert current_revision(engine) is None
    assert not {"instances", "predictions"} & set(sa.inspect(engine).get_table_names())
    command.upgrade(alembic_config(engine), "head")
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_sorter_db_downgrade_base_and_back_on_a_database_in_use(db_url, tmp_path):
    """On SQLite `sorter db downgrade base` stopped at 0002 ("error in view latest_predictions: no
    such table: main.instances": a batch rebuild renamed under 0001's views) and left its copy
    of the table behind, so the next try said "_alembic_tmp_instances already exists"."""
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct.dcm")
    sorter("scan", "--no-progress", str(tmp_path), url=db_url)
    assert "(empty)" in sorter("db", "downgrade", "base", url=db_url).output
    assert f"database at revision {head_revision()}" in sorter("db", "upgrade", url=db_url).output
    assert "models and migrations agree" in sorter("db", "check", url=db_url).output


def test_a_database_stamped_behind_its_tables_says_so_and_how_to_mend_it(db_url):
    """``sorter db stamp`` to an older revision by hand: every command then tried to migrate
    and stopped at "table model_thresholds already exists", and ``db check`` said only "Target
    database is not up to date.;"; now both say what is wrong and what to run."""
    sorter("db", "upgrade", url=db_url)
    old = "0003"  # the migrations after it create tables (model_thresholds ...)
    sorter("db", "stamp", old, url=db_url)
    check = sorter("db", "check", url=db_url, expect=1)
    assert f"the database is at revision {old}, this sorter's migrations at {head_revision()}" in check.output
    # PostgreSQL is never migrated by a command other than `sorter db upgrade` (it says to run it).
    for command in (("db", "upgrade"), ("status",)) if db_url.startswith("sqlite") else (("db", "upgrade"),):
        result = sorter(*command, url=db_url, expect=1)
        assert f"migrating the database from revision {old} failed:" in result.output, result.output
        assert "already exists" in result.output and "stamp the revision they are at" in result.output
        assert "Traceback" not in result.output
    sorter("db", "stamp", "head", url=db_url)
    assert "models and migrations agree" in sorter("db", "check", url=db_url).output


def test_a_database_without_the_schema_is_filled_only_on_purpose(db_url, tmp_path):
    """Pointed at the wrong database, `sorter status` created dicom-sorter's tables in it and
    reported zeros, and `sorter scan` put them beside another application's tables."""
    from alembic import command

    engine = create_db_engine(db_url)
    command.downgrade(alembic_config(engine), "base")
    refused = sorter("status", url=db_url, expect=1)
    assert "holds no dicom-sorter results yet: `sorter scan PATH`" in refused.output, refused.output
    assert current_revision(engine) is None
    assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
    (tmp_path / "empty").mkdir()
    sorter("scan", "--no-progress", str(tmp_path / "empty"), url=db_url)  # a command that writes: creates
    assert current_revision(engine) == head_revision()

    command.downgrade(alembic_config(engine), "base")
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE patients (id INTEGER)"))
    taken = sorter("scan", "--no-progress", str(tmp_path / "empty"), url=db_url, expect=1)
    assert "holds tables (patients) but no dicom-sorter schema: it is another application's" in taken.output
    assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version", "patients"}
    sorter("db", "upgrade", url=db_url)  # on purpose: allowed
    assert current_revision(engine) == head_revision()
    assert "models and migrations agree" in sorter("db", "check", url=db_url).output  # ours only
    with engine.begin() as connection:
        connection.execute(sa.text("DROP TABLE patients"))
    engine.dispose()


def test_tables_an_extension_made_are_no_other_applications(postgres_database, tmp_path):
    """A database created from a template with PostGIS holds PostGIS's `spatial_ref_sys` from the
    start: `sorter scan` refused it as another application's. A table an extension owns is part
    of the database's setup (made so here by adding it to plpgsql, as CREATE EXTENSION does)."""
    from alembic import command

    url = postgres_database
    engine = create_db_engine(url)
    command.downgrade(alembic_config(engine), "base")
    try:
        with engine.begin() as connection:
            connection.execute(sa.text("CREATE TABLE spatial_ref_sys (srid INTEGER PRIMARY KEY)"))
            connection.execute(sa.text("ALTER EXTENSION plpgsql ADD TABLE spatial_ref_sys"))
        (tmp_path / "empty").mkdir()
        sorter("scan", "--no-progress", str(tmp_path / "empty"), url=url)
        assert current_revision(engine) == head_revision()
        # Nor is the table drift between our models and migrations.
        assert "models and migrations agree" in sorter("db", "check", url=url).output
    finally:
        with engine.begin() as connection:
            connection.execute(sa.text("ALTER EXTENSION plpgsql DROP TABLE spatial_ref_sys"))
            connection.execute(sa.text("DROP TABLE spatial_ref_sys"))
        command.upgrade(alembic_config(engine), "head")
        engine.dispose()


def test_drift_between_models_and_database_fails_the_check(sqlite_url):
    engine, _ = open_database(sqlite_url)
    with engine.begin() as connection:
        connection.execute(sa.text("ALTER TABLE instances ADD COLUMN stray TEXT"))
    engine.dispose()
    result = sorter("db", "check", url=sqlite_url, expect=1)
    assert "stray" in result.output


def test_constraints_are_named_and_enums_stored_by_value(db_url):
    engine, sessions = open_database(db_url)
    inspector = sa.inspect(engine)
    assert inspector.get_pk_constraint("instances")["name"] in (
        "pk_instances",
        None,
    )  # SQLite forgets PK names
    assert {u["name"] for u in inspector.get_unique_constraints("instances")} == {
        "uq_instances_sop_instance_uid"
    }
    assert {f["name"] for f in inspector.get_foreign_keys("predictions")} == {
        "fk_predictions_instance_id_instances",
        "fk_predictions_model_id_models",
    }
    assert {i["name"] for i in inspector.get_indexes("instances")} >= {
        "ix_instances_status_id",
        "ix_instances_series_instance_uid",
        "ix_instances_study_instance_uid",
    }
    if engine.dialect.name == "postgresql":
        checks = {c["name"] for c in inspector.get_check_constraints("instances")}
        assert {"ck_instances_status", "ck_instances_header_label"} <= checks
    with sessions() as session:
        session.add(Instance(sop_instance_uid="1.2.3", path="/x", status=Status.SKIPPED))
        session.commit()
    engine.dispose()
    assert [tuple(r) for r in query(db_url, "SELECT status FROM instances")] == [("skipped",)]
    with pytest.raises(sa.exc.IntegrityError):
        engine = create_db_engine(db_url)
        try:
            with engine.begin() as connection:
                connection.execute(sa.text("UPDATE instances SET status = 'SKIPPED'"))
        finally:
            engine.dispose()


def test_the_embedded_default_is_created_and_migrated_on_first_use(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SORTER_DATABASE_URL", raising=False)
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["scan", "empty", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sorter.db").is_file()
    assert CliRunner().invoke(main, ["report", "--format", "json"]).exit_code == 0
    assert query(f"sqlite:///{tmp_path / 'sorter.db'}", "PRAGMA journal_mode")[0][0] == "wal"


def test_an_outdated_postgresql_schema_is_refused_not_migrated(postgres_database, monkeypatch):
    monkeypatch.setattr(db_session, "head_revision", lambda: "9999")
    engine = create_db_engine(postgres_database)
    with pytest.raises(DatabaseError, match="sorter db upgrade"):
        ensure_schema(engine)
    engine.dispose()


def test_postgresql_urls_use_psycopg_3():
    assert normalise_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalise_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalise_url("sqlite:///x.db") == "sqlite:///x.db"


def test_the_wheel_ships_the_migrations_and_the_bundled_model_with_its_graph(tmp_path):
    """What `pip install` (not -e) relies on: a wheel built from the repository holds every
    migration, the bundled artefact and its ONNX graph (package-data in pyproject.toml)."""
    import subprocess
    import sys
    import zipfile

    from sorter.model.artefact import DEFAULT_MODEL_PATH, file_sha256

    root = Path(__file__).resolve().parent.parent
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    built = subprocess.run(
        [*pip_wheel, "-w", str(tmp_path), str(root)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("dicom_sorter-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    revisions = {p.name for p in (db_session.MIGRATIONS_DIR / "versions").glob("0*.py")}
    assert revisions and {f"sorter/migrations/versions/{r}" for r in revisions} <= names
    assert "sorter/migrations/env.py" in names
    sha = file_sha256(DEFAULT_MODEL_PATH)
    model = "sorter/model/default/"
    assert {f"{model}model.pt", f"{model}{sha}.onnx", f"{model}{sha}.json"} <= names
