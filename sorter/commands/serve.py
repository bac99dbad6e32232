"""``sorter serve``: the review page for discrepancies (:mod:`sorter.review.web`)."""

from __future__ import annotations

import getpass
import socket

import click
import sqlalchemy as sa

from sorter.commands.common import blank_is_unset, cannot_bind, database, database_option
from sorter.db.session import UNDEFINED_TABLE, database_problem, sqlstate


def _root_path(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str:
    from sorter.review.security import root_path_of

    try:
        return root_path_of(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.command()
@click.option("--bind", default="127.0.0.1", show_default=True, envvar="SORTER_SERVE_BIND", help="Address.")
@click.option(
    "--port", type=click.IntRange(1, 65535), default=8080, show_default=True, envvar="SORTER_SERVE_PORT"
)
@click.option(
    "--token",
    envvar="SORTER_SERVE_TOKEN",
    help="Require this token: browsers log in once on /login, scripts send 'Authorization: Bearer TOKEN'.",
)
@click.option(
    "--basic-auth",
    "basic_auth",
    metavar="USER:PASSWORD",
    envvar="SORTER_SERVE_BASIC_AUTH",
    help="Require HTTP basic auth; the user name is recorded on each decision.",
)
@click.option(
    "--reviewer",
    envvar="SORTER_REVIEWER",
    callback=blank_is_unset,
    help="Name recorded on decisions without basic auth (default: this login's user name).",
)
@click.option(
    "--root-path",
    envvar="SORTER_SERVE_ROOT_PATH",
    callback=_root_path,
    help=(
        "URL prefix the pages live under behind a reverse proxy that passes it on (e.g. /sorter"
        " for https://host/sorter/); default: the root."
    ),
)
@database_option
def serve(
    bind: str,
    port: int,
    token: str | None,
    basic_auth: str | None,
    reviewer: str | None,
    root_path: str,
    database_url: str | None,
) -> None:
    """Serve the review page: discrepancies with thumbnails and Grad-CAM; confirm, reject or skip.

    It shows patients' pixels: it binds 127.0.0.1 by default and refuses any other address
    unless --token or --basic-auth is set (put TLS in front with a reverse proxy; see the README).
    """
    try:
        import uvicorn

        from sorter.review.security import LOOPBACK_HOSTS, Access, is_loopback
        from sorter.review.state import Refresher
        from sorter.review.web import create_app
    except ImportError as exc:
        raise click.ClickException(f"the review page needs {exc.name}: pip install 'dicom-sorter'") from exc
    access = Access(token=token or None, reviewer=reviewer or _login_name())
    if basic_auth:
        user, sep, password = basic_auth.partition(":")
        if not (user and sep and password):
            raise click.UsageError("--basic-auth takes USER:PASSWORD, both non-empty")
        access.basic_user, access.basic_password = user, password
    if token is not None and len(token) < 16:
        raise click.UsageError("--token must be at least 16 characters (try: openssl rand -hex 24)")
    if not is_loopback(bind) and not access.required:
        raise click.UsageError(
            f"refusing to serve patients' images on {bind} without --token or --basic-auth "
            "(the page is open to anyone who can reach the address); bind 127.0.0.1 or set one"
        )
    if not access.required:
        access.allowed_hosts = tuple(dict.fromkeys([*LOOPBACK_HOSTS, bind]))
    with database(database_url, create=True) as (_engine, sessions):
        refresher = Refresher()
        try:
            with sessions() as session:  # the queue's summary: built once here, then kept current
                built = refresher.ensure(session, force=True)
        except sa.exc.DBAPIError as exc:
            problem = database_problem(exc)
            if sqlstate(exc) == UNDEFINED_TABLE or "no such table" in problem:
                problem += " (is it migrated? sorter db check)"
            raise click.ClickException(f"cannot use the results database: {problem}") from exc
        if built is not None:
            click.echo(f"review queue {built.kind}: {built.series} series in {built.seconds:.1f} s", err=True)
        app = create_app(sessions, access, refresher, overview_at_start=True, root_path=root_path)
        guard = "token" if token else ("basic auth" if basic_auth else "loopback only, no login")
        listening = _bound_socket(bind, port)  # before the page is announced
        click.echo(f"review page on http://{bind}:{port}{root_path}/ ({guard}); Ctrl-C stops it", err=True)
        config = uvicorn.Config(app, host=bind, port=port, log_level="warning", access_log=False)
        server = uvicorn.Server(config)
        try:
            server.run(sockets=[listening])
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on: that is a stop
            click.echo("review page stopped", err=True)
            return
        except OSError as exc:
            raise click.ClickException(f"cannot serve on {bind}:{port}: {exc.strerror or exc}") from exc
        finally:
            listening.close()
        if not server.started:
            raise click.ClickException(f"the review page on {bind}:{port} did not start")


def _bound_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, or one line saying why not.

    Bound here rather than by uvicorn, which on a busy port logs its own line after ours has
    announced the page and exits with its status 3."""
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise click.ClickException(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart while TIME_WAIT
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise cannot_bind("serve", host, port, exc) from exc
    return sock


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in a bare container
        return "reviewer"
