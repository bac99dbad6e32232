"""The review page (``sorter serve``): a small Starlette app over the results database.

Pages: the overview (``/``), the discrepancy queue (``/queue``), a series (``/series/UID``) with
thumbnails and Grad-CAM on demand, and the decision form's target (``POST /review``); thumbnails
are served by instance id only (``/instances/ID/thumb.png``), never by path. JSON for scripts:
``/api/queue`` and ``POST /api/review``. Nothing is fetched from the internet: the CSS and the
keyboard script ship in ``static/``.

Endpoints that touch the database or decode pixels are plain functions, which Starlette runs in
its thread pool; the form endpoint is async only to read the form.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from sorter import reports
from sorter.db.queries import instances, models, predictions
from sorter.dicom.headers import describe_series
from sorter.domain import ALL_LABELS
from sorter.review import render, state, store
from sorter.review.security import SESSION_COOKIE, Access, same_origin
from sorter.status import pipeline_status

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
#: Thumbnails on a series page.
THUMBNAILS = 12
PAGE_SIZE = 50
#: The overview aggregates the whole archive: recomputed in the background when older than this.
OVERVIEW_TTL_S = 60.0
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


class Overview:
    """The overview's numbers: they aggregate every row (seconds on a million instances), so they
    are computed in the background and served from the last result; one older than
    :data:`OVERVIEW_TTL_S` is served while its successor is computed."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._lock = threading.Lock()
        self._value: dict[str, Any] | None = None
        self._at = 0.0
        self._running = False
        self.error: str | None = None

    def start(self) -> None:
        """Compute in a background thread unless a computation is running."""
        with self._lock:
            if self._running:
                return
            self._running = True
        threading.Thread(target=self._run, name="overview", daemon=True).start()

    def compute(self) -> dict[str, Any]:
        """Compute the numbers now, in this thread, and keep them."""
        with self._sessions() as session:  # sorter report's sections, sorter status, reviews
            value: dict[str, Any] = dict(reports.report(session))
            value["status"] = pipeline_status(session)
        value["computed_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        with self._lock:
            self._value, self._at, self.error = value, time.monotonic(), None
        return value

    def _run(self) -> None:
        try:
            self.compute()
        except Exception as exc:  # shown on the page; the next request tries again
            log.warning("review page: the overview failed: %s", exc)
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                self._running = False

    def get(self, refresh: bool = False) -> dict[str, Any] | None:
        """The latest numbers (``None`` before the first are ready); starts a new computation
        when they are stale or ``refresh``."""
        with self._lock:
            value, age = self._value, time.monotonic() - self._at
        if refresh or value is None or age > OVERVIEW_TTL_S:
            self.start()
        return value


def _filters(params: Any) -> store.Filters:
    def text(name: str) -> str | None:
        value = (params.get(name) or "").strip()
        return value or None

    try:
        min_confidence = float(params.get("min_confidence") or 0)
    except ValueError as exc:
        raise store.ReviewError("min_confidence must be a number") from exc
    return store.Filters(
        verdict=text("verdict") or "disagree",
        label=text("label"),
        header=text("header"),
        source=text("source"),
        min_confidence=min_confidence,
        review=text("review") or "unreviewed",
    )


#: The most rows one ``GET /api/queue`` returns.
MAX_API_LIMIT = 500


def _api_limit(params: Any) -> int:
    """``limit`` of ``GET /api/queue``: 1 to :data:`MAX_API_LIMIT` (a larger one is capped); a
    negative one was a 500 with a traceback, 0 an empty page that looked like an empty queue."""
    raw = params.get("limit") or str(PAGE_SIZE)
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit < 1:
        raise store.ReviewError(f"limit must be a whole number from 1 to {MAX_API_LIMIT}, not {raw!r}")
    return min(limit, MAX_API_LIMIT)


def _query(filters: store.Filters, **extra: Any) -> str:
    values = {
        "verdict": filters.verdict,
        "label": filters.label or "",
        "header": filters.header or "",
        "source": filters.source or "",
        "min_confidence": f"{filters.min_confidence:g}" if filters.min_confidence else "",
        "review": filters.review,
        **extra,
    }
    return urlencode({k: v for k, v in values.items() if v not in ("", None)})


def create_app(
    sessions: sessionmaker[Session],
    access: Access,
    refresher: state.Refresher | None = None,
    overview_at_start: bool = False,
    root_path: str = "",
) -> Starlette:
    """The review app over ``sessions``' database, with ``access`` guarding it; ``refresher`` keeps
    the queue's summary table current (a new one when not given). ``overview_at_start`` begins
    computing the overview at once rather than on its first request. ``root_path`` (``/sorter``,
    from :func:`~sorter.review.security.root_path_of`) serves every page under that prefix, for a
    reverse proxy that passes it on; ``""`` serves them at the root."""
    root = root_path
    templates = Jinja2Templates(directory=str(_HERE / "templates"))
    overview_cache = Overview(sessions)
    if overview_at_start:
        overview_cache.start()
    refresher = refresher or state.Refresher()

    def queue(
        session: Session, level: str, filters: store.Filters, after: str | None, limit: int
    ) -> store.Page:
        if level != "instance":
            refresher.ensure(session)
        return store.queue(session, level, filters, after, limit)

    def page(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> Response:
        session_id = request.state.session
        context = {
            "csrf": access.csrf_token(session_id),
            "labels": [label.value for label in ALL_LABELS],
            "reviewer": request.state.reviewer,
            "login_required": bool(access.token),
            "root": root,
            **context,
        }
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    def overview(request: Request) -> Response:
        refresh = request.query_params.get("refresh") == "1"
        numbers = overview_cache.get(refresh)
        return page(request, "overview.html", {"o": numbers, "error": overview_cache.error})

    def queue_page(request: Request) -> Response:
        level = request.query_params.get("level") or "series"
        try:
            filters = _filters(request.query_params)
            with sessions() as session:
                result = queue(session, level, filters, request.query_params.get("after") or None, PAGE_SIZE)
        except store.ReviewError as exc:
            return page(request, "error.html", {"message": str(exc)}, 400)
        return page(
            request,
            "queue.html",
            {
                "level": level,
                "f": filters,
                "rows": result.rows,
                "next_query": _query(filters, level=level, after=result.next_after)
                if result.next_after
                else None,
                "filter_query": _query(filters),
                "levels": store.LEVELS,
                "states": store.REVIEW_STATES,
                "verdicts": store.QUEUE_VERDICTS,
            },
        )

    def series_page(request: Request) -> Response:
        uid = request.path_params["uid"]
        try:
            filters = _filters(request.query_params)
        except store.ReviewError as exc:
            return page(request, "error.html", {"message": str(exc)}, 400)
        with sessions() as session:
            rows = store.series_rows(session, [uid])
            if not rows:
                return page(request, "error.html", {"message": "No classified series with that UID."}, 404)
            members = store.series_instances(session, uid)
            shown = store.evenly_spaced(members, THUMBNAILS)
            following = queue(session, "series", filters, uid, 1).rows
            past = store.history(session, series_uid=uid)
            study = rows[0]["study_instance_uid"]
            siblings = store.study_rows(session, [study])[0]["series"] if study else []
        header = describe_series(shown[len(shown) // 2]["path"]) if shown else {}
        return page(
            request,
            "series.html",
            {
                "s": rows[0],
                "shown": shown,
                "n_members": len(members),
                "header": header,
                "history": past,
                "siblings": siblings,
                "next_uid": following[0]["series_instance_uid"] if following else None,
                "filter_query": _query(filters),
            },
        )

    def _instance(instance_id: int) -> dict[str, Any]:
        shown = instances.outerjoin(predictions, predictions.c.id == instances.c.prediction_id).outerjoin(
            models, models.c.id == predictions.c.model_id
        )
        stmt = (
            sa.select(
                instances.c.path,
                models.c.spec,
                models.c.path.label("model_path"),
                models.c.sha256,
                predictions.c.label.label("predicted"),
            )
            .select_from(shown)
            .where(instances.c.id == instance_id)
        )
        with sessions() as session:
            row = session.execute(stmt).first()
        if row is None:
            raise HTTPException(404, "no such instance")
        return dict(row._mapping)

    def thumb(request: Request) -> Response:
        row = _instance(request.path_params["instance_id"])
        try:
            data = render.thumbnail(row["path"], row["spec"])
        except render.RenderError as exc:
            return Response(str(exc), status_code=422, media_type="text/plain")
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=600"})

    def gradcam(request: Request) -> Response:
        row = _instance(request.path_params["instance_id"])
        if row["sha256"] is None:
            return Response("the instance has no prediction", status_code=404, media_type="text/plain")
        # Without ?label= the map of the predicted label (was "the model has no label "); any case.
        label = (request.query_params.get("label") or "").strip().upper() or row["predicted"].value
        try:
            data = render.grad_cam(row["path"], row["model_path"], row["sha256"], label)
        except render.RenderError as exc:
            return Response(str(exc), status_code=422, media_type="text/plain")
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=600"})

    def _decide(request: Request, form: Any) -> list[int]:
        decision = store.Decision(
            level=str(form.get("level") or ""),
            uid=str(form.get("uid") or ""),
            decision=str(form.get("decision") or ""),
            reviewer=request.state.reviewer,
            label=str(form.get("label") or "") or None,
            note=str(form.get("note") or "") or None,
        )
        with sessions() as session:
            ids = store.record(session, decision)
            session.commit()
        log.info(
            "review %s %s %s by %s (%d rows)",
            decision.decision,
            decision.level,
            decision.uid,
            decision.reviewer,
            len(ids),
        )
        return ids

    async def review_form(request: Request) -> Response:
        form = await request.form()
        if not access.check_csrf(request.state.session, str(form.get("csrf") or "")):
            return Response("The form expired or did not come from this page: reload it.", status_code=403)
        try:
            await run_in_threadpool(_decide, request, form)
        except store.ReviewError as exc:
            return page(request, "error.html", {"message": str(exc)}, 400)
        target = str(form.get("next") or "")
        if not target.startswith(f"{root}/") or target.startswith("//"):  # ours only, never another site
            target = f"{root}/queue"
        return RedirectResponse(target, status_code=303)

    def api_queue(request: Request) -> Response:
        try:
            filters = _filters(request.query_params)
            with sessions() as session:
                result = queue(
                    session,
                    request.query_params.get("level") or "series",
                    filters,
                    request.query_params.get("after") or None,
                    _api_limit(request.query_params),
                )
        except (store.ReviewError, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        rows = [{k: v for k, v in row.items() if k not in ("path", "series")} for row in result.rows]
        body = json.dumps({"rows": rows, "next_after": result.next_after}, default=str)
        return Response(body, media_type="application/json")

    async def api_review(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "the body must be JSON"}, status_code=400)
        if not isinstance(body, dict):  # a list, a string or null was a 500 with a traceback
            example = '{"level": "series", "uid": "1.2.3", "decision": "confirm"}'
            return JSONResponse({"error": f"the body must be a JSON object, e.g. {example}"}, status_code=400)
        # A bearer token is never sent by a browser on its own: only cookie and basic-auth
        # clients, whose credentials are ambient, need the CSRF token (GET /api/csrf).
        if not request.state.bearer and not access.check_csrf(
            request.state.session, request.headers.get("x-csrf-token")
        ):
            return JSONResponse({"error": "missing or wrong X-CSRF-Token (GET /api/csrf)"}, status_code=403)
        try:
            ids = await run_in_threadpool(_decide, request, body)
        except store.ReviewError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"recorded": ids})

    def api_csrf(request: Request) -> Response:
        return JSONResponse({"csrf": access.csrf_token(request.state.session)})

    async def login(request: Request) -> Response:
        if request.method == "GET":
            return page(request, "login.html", {"error": None})
        form = await request.form()
        if not access.check_token(str(form.get("token") or "")):
            log.warning("review page: a wrong token from %s", request.client.host if request.client else "?")
            return page(request, "login.html", {"error": "Wrong token."}, 401)
        response = RedirectResponse(f"{root}/", status_code=303)
        _set_session(response, access.new_session(), root)
        return response

    def healthz(_request: Request) -> Response:
        return Response("ok\n", media_type="text/plain")

    routes = [
        Route("/", overview),
        Route("/queue", queue_page),
        Route("/series/{uid:str}", series_page),
        Route("/instances/{instance_id:int}/thumb.png", thumb),
        Route("/instances/{instance_id:int}/gradcam.png", gradcam),
        Route("/review", review_form, methods=["POST"]),
        Route("/api/queue", api_queue),
        Route("/api/review", api_review, methods=["POST"]),
        Route("/api/csrf", api_csrf),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/healthz", healthz),
        Mount("/static", StaticFiles(directory=str(_HERE / "static")), name="static"),
    ]

    def database_down(request: Request, exc: Exception) -> Response:
        # One line in the log and on the page, not a traceback: the database is the usual cause.
        log.warning("review page: %s failed: %s", request.url.path, str(exc).splitlines()[0][:200])
        message = "The results database is not answering; try again in a moment."
        if local_path(request, root).startswith("/api/"):
            return JSONResponse({"error": message}, status_code=503)
        return page(request, "error.html", {"message": message}, 503)

    if root:
        # Every page under the prefix; the bare root (a direct visit past the proxy) points there.
        routes = [
            Route("/", lambda _request: RedirectResponse(f"{root}/", status_code=307)),
            Mount(root, routes=routes),
        ]
    middleware = [Middleware(_Guard, access=access, root=root)]
    if access.allowed_hosts:
        middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=list(access.allowed_hosts)))
    return Starlette(
        routes=routes, middleware=middleware, exception_handlers={sa.exc.DBAPIError: database_down}
    )


def _set_session(response: Response, value: str, root: str) -> None:
    response.set_cookie(
        SESSION_COOKIE, value, httponly=True, samesite="strict", max_age=12 * 3600, path=f"{root}/"
    )


def local_path(request: Request, root: str) -> str:
    """The request's path below ``root`` (``/sorter/api/queue`` -> ``/api/queue``)."""
    path = request.url.path
    if root and (path == root or path.startswith(f"{root}/")):
        return path[len(root) :] or "/"
    return path


class _Guard(BaseHTTPMiddleware):
    """Authentication, the per-client session the CSRF tokens bind to, origin checks on POST,
    and security headers on every response."""

    def __init__(self, app: Any, access: Access, root: str = "") -> None:
        super().__init__(app)
        self.access = access
        self.root = root

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        access, root = self.access, self.root
        path = local_path(request, root)
        cookie = request.cookies.get(SESSION_COOKIE)
        session_ok = access.valid_session(cookie)
        request.state.reviewer = access.reviewer
        request.state.bearer = False
        if path == "/healthz" or path.startswith("/static/"):
            return _secured(await call_next(request))
        if access.basic_user:
            user = access.check_basic(request.headers.get("authorization"))
            if user is None:
                return _secured(
                    Response(
                        "Authentication required.\n",
                        status_code=401,
                        headers={"WWW-Authenticate": 'Basic realm="dicom-sorter review"'},
                    )
                )
            request.state.reviewer = user
        elif access.token and path != "/login":
            bearer = request.headers.get("authorization", "")
            if bearer.lower().startswith("bearer ") and access.check_token(bearer[7:].strip()):
                cookie, session_ok = "bearer", True
                request.state.bearer = True
            elif not session_ok:
                if path.startswith("/api/"):
                    return _secured(JSONResponse({"error": "log in or send a bearer token"}, status_code=401))
                return _secured(RedirectResponse(f"{root}/login", status_code=303))
        # Without a token every client gets a session on its first request (the CSRF tokens bind
        # to it); with one, only /login issues sessions.
        issue = not session_ok and not access.token
        if issue:
            cookie = access.new_session()
        request.state.session = (cookie or "") if session_ok or issue else ""
        if request.method == "POST" and not (
            path == "/login"
            or request.state.bearer
            or same_origin(
                request.headers.get("origin"), request.headers.get("referer"), request.headers.get("host")
            )
        ):
            return _secured(Response("Cross-origin request refused.\n", status_code=403))
        response = await call_next(request)
        if issue:
            _set_session(response, request.state.session, root)
        return _secured(response)


def _secured(response: Response) -> Response:
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if response.media_type != "image/png":
        response.headers.setdefault("Cache-Control", "no-store")
    return response
