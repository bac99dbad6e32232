"""The ``sorter`` command group; each command is a composition root."""

from __future__ import annotations

import logging

import click

from sorter import __version__
from sorter.commands.adapt import adapt
from sorter.commands.classify import classify
from sorter.commands.db import db_group
from sorter.commands.export import export
from sorter.commands.listen import listen
from sorter.commands.models import models_group
from sorter.commands.oneline import CONTEXT_SETTINGS, OneLineErrors
from sorter.commands.reclassify import reclassify
from sorter.commands.report import discrepancies, failures, find, report
from sorter.commands.rules import rules_group
from sorter.commands.scan import scan
from sorter.commands.serve import serve
from sorter.commands.status import status
from sorter.commands.watch import watch
from sorter.commands.worker import worker
from sorter.dicom.quiet import quiet_pydicom
from sorter.logs import FORMATS, configure_logging


@click.group(cls=OneLineErrors, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="sorter")
@click.option("-v", "--verbose", count=True, help="-v for info, -vv for debug logging.")
@click.option(
    "--log-format",
    type=click.Choice(FORMATS),
    default="text",
    envvar="SORTER_LOG_FORMAT",
    show_default=True,
    help="Log lines on stderr: text, or one JSON object per line.",
)
def main(verbose: int, log_format: str) -> None:
    """dicom-sorter: sort imaging archives by what the pixels show."""
    configure_logging(logging.WARNING - 10 * min(verbose, 2), log_format)
    quiet_pydicom(verbose=verbose >= 2)


main.add_command(classify)
main.add_command(scan)
main.add_command(db_group)
main.add_command(models_group)
main.add_command(rules_group)
main.add_command(report)
main.add_command(discrepancies)
main.add_command(find)
main.add_command(failures)
main.add_command(export)
main.add_command(reclassify)
main.add_command(listen)
main.add_command(watch)
main.add_command(status)
main.add_command(worker)
main.add_command(serve)
main.add_command(adapt)


def _show_envvars(command: click.Command) -> None:
    """Every option's ``--help`` names its ``SORTER_`` variable (click's ``show_envvar``)."""
    for param in command.params:
        if isinstance(param, click.Option) and param.envvar:
            param.show_envvar = True
    for sub in getattr(command, "commands", {}).values():
        _show_envvars(sub)


_show_envvars(main)
