"""``sorter models``: the models a database has seen, and ``use`` to choose the one the views show."""

from __future__ import annotations

import click

from sorter.commands.common import database, database_option, format_option, write_rows
from sorter.db import catalogue


@click.group("models", invoke_without_command=True)
@format_option
@database_option
@click.pass_context
def models_group(ctx: click.Context, fmt: str, database_url: str | None) -> None:
    """List models (`sorter models [list]`) and choose the active one (`sorter models use`)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_models, fmt=fmt, database_url=database_url)


@models_group.command("list")
@format_option
@database_option
def list_models(fmt: str = "table", database_url: str | None = None) -> None:
    """Every model this database has seen; `*` marks the active one, whose predictions views show."""
    with database(database_url) as (_engine, sessions), sessions() as session:
        records = catalogue.list_models(session)
    write_rows((r.as_row() for r in records), catalogue.COLUMNS, fmt)
    if fmt == "table" and not records:
        click.echo("no model yet: `sorter scan` registers the one it uses", err=True)


@models_group.command("use")
@click.argument("ref")
@database_option
def use(ref: str, database_url: str | None) -> None:
    """Make REF (a name from `sorter models` or a sha256 prefix) the model every view shows.

    Instant for the instances REF has classified (their stored prediction is shown again);
    the rest keep another model's until `sorter reclassify --model REF_PATH` classifies them.
    Roll back with `use` of the previous model.
    """
    with database(database_url) as (_engine, sessions), sessions() as session:
        try:
            record = catalogue.resolve(session, ref)
        except catalogue.UnknownModel as exc:
            raise click.ClickException(str(exc)) from exc
        if record.role == "out_of_fold":
            raise click.ClickException(
                f"{record.name} holds an adaptation's out-of-fold predictions, not a model: "
                "use the adapted model itself (`sorter models` lists it)"
            )
        shown, missing = catalogue.activate(session, record.id)
        session.commit()
    click.echo(f"active model: {record.name} ({record.sha256[:12]}); {shown} instances show its predictions")
    if missing:
        where = record.path or "ITS_FILE"
        click.echo(
            f"{missing} classified instances have no prediction from it and still show another model's: "
            f"`sorter reclassify --model {where}` classifies them",
            err=True,
        )
