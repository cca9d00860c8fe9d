"""The console's ASGI app: the REST API, the pages, log in and out, ``/healthz``, the trainer service's
Prometheus ``/metrics`` (when it runs the console), and the error handling that keeps it answering
(401/403/404/422 with a message, 503 while the database is away)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import FastAPI, Form, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge_agent import __version__
from trainer.console import api, pages
from trainer.console.auth import SESSION_COOKIE, check_password, new_token, token_hash
from trainer.console.deps import ConsoleContext, NotLoggedIn, Who
from trainer.fleet.metrics import exposition
from trainer.store.console_users import close_session, open_session, token_principal

log = logging.getLogger(__name__)
HERE = Path(__file__).parent


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/") or "application/json" in request.headers.get("accept", "")


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(NotLoggedIn)
    async def not_logged_in(request: Request, _exc: NotLoggedIn) -> Response:
        if _wants_json(request):
            return JSONResponse(
                {"detail": "log in first (session cookie or Authorization: Bearer <token>)"},
                401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", 303)

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    async def database_away(request: Request, exc: DBAPIError) -> Response:
        log.warning("console: the database did not answer: %s", exc.orig or exc)
        request.app.state.db_error = (time.time(), str(exc.orig or exc).splitlines()[0][:200])
        if _wants_json(request):
            return JSONResponse(
                {"detail": "the database is unreachable; try again shortly"},
                503,
                headers={"Retry-After": "5"},
            )
        return pages.unavailable(request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if _wants_json(request) or exc.status_code in (401, 405):
            return JSONResponse(
                {"detail": exc.detail}, exc.status_code, headers=getattr(exc, "headers", None)
            )
        return pages.error_page(request, exc.status_code, str(exc.detail))


def _install_login(app: FastAPI) -> None:
    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.post("/login", include_in_schema=False)
    def login(
        request: Request,
        username: Annotated[str, Form(max_length=200)],
        password: Annotated[str, Form(max_length=1000)],
        next: Annotated[str, Form(max_length=2000)] = "/",  # noqa: A002 - the form field's name
    ) -> Response:
        ctx: ConsoleContext = request.app.state.ctx
        keys = [f"ip:{request.client.host if request.client else '?'}", f"user:{username}"]
        wait = ctx.limiter.retry_after(keys)
        if wait > 0:
            return pages.login_page(request, f"too many failed logins: try again in {wait:.0f} s", 429, next)
        who = check_password(ctx.store, username, password)
        if who is None:
            ctx.limiter.failed(keys)
            ctx.store.audit(username, "session.refused", f"user/{username}", {"from": keys[0]})
            return pages.login_page(request, "wrong user name or password", 401, next)
        ctx.limiter.succeeded(keys)
        token = new_token()
        open_session(ctx.store, who.username, token_hash(token), new_token(), ctx.session_ttl_s)
        target = next if next.startswith("/") and not next.startswith("//") else "/"
        resp = RedirectResponse(target, 303)
        resp.set_cookie(
            SESSION_COOKIE,
            token,
            max_age=int(ctx.session_ttl_s),
            httponly=True,
            samesite="strict",
            secure=ctx.secure_cookies,
            path="/",
        )
        return resp

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request) -> Response:
        ctx: ConsoleContext = request.app.state.ctx
        if cookie := request.cookies.get(SESSION_COOKIE):
            close_session(ctx.store, token_hash(cookie))
        resp = RedirectResponse("/login", 303)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp


SCRAPE_TOKEN_GRACE_S = 600.0
"""While the database is away, an API token that scraped /metrics within this long still may: Prometheus
goes on reading the service's own counters and ``edgefleet_store_up 0`` instead of losing the target."""


def _scraper_allowed(ctx: ConsoleContext, authorization: str) -> bool:
    """Whether an ``Authorization`` header carries a console API token (any role may scrape)."""
    if authorization[:7].lower() != "bearer ":
        return False
    digest = token_hash(authorization[7:].strip())
    try:
        ok = token_principal(ctx.store, digest) is not None
    except DBAPIError:  # the database is away: trust a token it accepted a moment ago
        return time.monotonic() - ctx.scrape_tokens.get(digest, -SCRAPE_TOKEN_GRACE_S) < SCRAPE_TOKEN_GRACE_S
    if ok:
        ctx.scrape_tokens[digest] = time.monotonic()
    else:
        ctx.scrape_tokens.pop(digest, None)
    return ok


def _install_metrics(app: FastAPI) -> None:
    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        """The trainer service's Prometheus metrics, when the console runs in its process."""
        ctx: ConsoleContext = request.app.state.ctx
        if ctx.metrics is None:
            detail = "no metrics here: they are served when `trainer serve` runs the console with metrics:"
            return JSONResponse({"detail": detail}, 404)
        if ctx.metrics_auth != "none" and not _scraper_allowed(ctx, request.headers.get("authorization", "")):
            return JSONResponse(
                {"detail": "scraping needs a console API token: Authorization: Bearer <token>"},
                401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        body, content_type = exposition(ctx.metrics, request.headers.get("accept"))
        return Response(body, headers={"Content-Type": content_type})


def create_app(ctx: ConsoleContext) -> FastAPI:
    """The console for ``ctx`` (its store, repository and broker)."""
    app = FastAPI(
        title="EdgeFleet console API",
        version=__version__,
        description="Fleet, devices, telemetry, models, releases, rollouts, labelling, alerts and audit log.",
        openapi_url=None,  # served below, to logged-in callers only
        docs_url=None,  # Swagger UI loads scripts from a CDN; the console works air-gapped
        redoc_url=None,
    )
    app.state.ctx = ctx
    app.state.db_error = None
    _install_handlers(app)
    _install_login(app)
    _install_metrics(app)

    @app.get("/api/v1/openapi.json", include_in_schema=False)
    def openapi(_who: Who) -> JSONResponse:
        return JSONResponse(app.openapi())

    app.include_router(api.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next):  # noqa: ANN001, ANN202 - Starlette hook
        started = time.perf_counter()
        resp = await call_next(request)
        # the server's own time for the request (browser dev tools and the console benchmark read it)
        resp.headers["Server-Timing"] = f"app;dur={1000 * (time.perf_counter() - started):.1f}"
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("X-Frame-Options", "SAMEORIGIN")
        resp.headers.setdefault("Referrer-Policy", "same-origin")
        return resp

    return app
