"""PostgreSQL roles (README, "PostgreSQL roles"): the README's GRANT block, run as written, lets a
service role write and an analyst role read, through a `sorter db upgrade` that re-creates views;
a role without a privilege gets one line that says what it needs, never "is it migrated?"."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from db_support import copy_dicom, pydicom_file, scan, small_archive, truncate
from support import free_port

from sorter.cli import main
from sorter.db.session import create_db_engine

pytest_plugins = ["db_fixtures"]

README = Path(__file__).resolve().parents[1] / "README.md"


def _grant_block() -> str:
    text = README.read_text()
    section = text[text.index("### PostgreSQL roles") :]
    match = re.search(r"```sql\n(.*?)```", section, re.S)
    assert match, "the README's PostgreSQL roles section lost its SQL block"
    return match.group(1)


@pytest.fixture()
def roles(postgres_database: str) -> Iterator[dict[str, str]]:
    """The README's two roles under names of this test's own, and their URLs."""
    truncate(postgres_database)
    suffix = uuid.uuid4().hex[:8]
    names = {"sorter_service": f"sorter_service_{suffix}", "analyst": f"analyst_{suffix}"}
    sql = _grant_block()
    for readme_name, name in names.items():
        sql = re.sub(rf"\b{readme_name}\b", name, sql)
    owner = create_db_engine(postgres_database)
    # As an owner who set the roles up on an older revision: the upgrade re-creates views.
    _sorter("db", "downgrade", "0009", url=postgres_database)
    try:
        with owner.begin() as connection:
            for statement in filter(None, (s.strip() for s in sql.split(";"))):
                if not statement.startswith("--"):
                    connection.execute(sa.text(statement))
        _sorter("db", "upgrade", url=postgres_database)
        url = sa.make_url(postgres_database)
        yield {
            key: url.set(username=name).render_as_string(hide_password=False) for key, name in names.items()
        }
    finally:
        _sorter("db", "upgrade", url=postgres_database)
        with owner.begin() as connection:
            for name in names.values():
                connection.execute(sa.text(f'DROP OWNED BY "{name}"'))
                connection.execute(sa.text(f'DROP ROLE "{name}"'))
        owner.dispose()


def _sorter(*args: str, url: str) -> Result:
    result = CliRunner().invoke(main, [*args, "--database-url", url])
    assert result.exit_code == 0, f"{args}: exit {result.exit_code}: {result.output}\n{result.exception!r}"
    return result


def _refused(*args: str, url: str) -> str:
    result = CliRunner().invoke(main, [*args, "--database-url", url])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def test_the_readme_roles_write_and_read_and_a_missing_privilege_is_one_line(roles, tiny_model, tmp_path):
    service, analyst = roles["sorter_service"], roles["analyst"]
    small_archive(tmp_path / "archive")
    scan(service, tiny_model, tmp_path / "archive", tmp=tmp_path)
    _sorter("models", "use", "tiny.pt", url=service)

    for command in (
        ["report"],
        ["find", "--label", "CT"],
        ["discrepancies", "--level", "series"],
        ["failures"],
        ["status"],
        ["export", "--out", str(tmp_path / "export" / "manifest.csv")],
    ):
        _sorter(*command, url=analyst)

    reader = create_db_engine(analyst)
    try:  # views the upgrade re-created (what `discrepancies --by label-issue` reads after an adapt)
        with reader.connect() as connection:
            for view in ("adapted_series", "adapted_studies"):
                assert connection.execute(sa.text(f"SELECT count(*) FROM {view}")).scalar_one() == 0
    finally:
        reader.dispose()

    late = copy_dicom(pydicom_file("MR_small.dcm"), tmp_path / "late" / "mr.dcm")
    line = _refused("scan", "--model", str(tiny_model), "--no-progress", str(late.parent), url=analyst)
    assert "permission denied" in line and "README: PostgreSQL roles" in line, line
    line = _refused("serve", "--port", str(free_port()), url=analyst)
    assert "permission denied" in line and "README: PostgreSQL roles" in line, line
    assert "migrated" not in line, line
