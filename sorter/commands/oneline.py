"""The command groups' last word on an error that escaped a command: one ``Error:`` line, status 1.

Each command checks what it depends on before it starts (and says what to do); what can still
fail under it is turned into one line here rather than a traceback: an error dicom-sorter raises
on purpose (a model that cannot be read, a manifest with nothing decodable), a database that fails
(a read-only file, a full disk, a server that went away: committed work stays, `sorter scan`
resumes from it), or a file the operating system refuses. ``-vv`` (``-v`` for ``sorter-train``)
logs where it happened.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

import click
from sqlalchemy.exc import DBAPIError

from sorter.db.session import database_problem
from sorter.errors import SorterError

log = logging.getLogger(__name__)

#: Both command-line tools and every command take ``-h`` as well as ``--help`` (children inherit it).
CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"]}


class OneLineErrors(click.Group):
    """A :class:`click.Group` whose commands end with one ``Error:`` line on the errors above."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SorterError as exc:
            log.debug("error", exc_info=True)
            raise click.ClickException(str(exc)) from exc
        except DBAPIError as exc:
            log.debug("database error", exc_info=True)
            raise click.ClickException(f"database error: {database_problem(exc)}") from exc
        except OSError as exc:
            if exc.errno == errno.EPIPE:  # click's own: a reader such as `head` went away
                raise
            log.debug("OS error", exc_info=True)
            where = f": {exc.filename}" if exc.filename is not None else ""
            raise click.ClickException(f"{exc.strerror or exc}{where}") from exc
