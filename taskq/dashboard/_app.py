"""The dashboard as an ASGI application: routing, the checks every request
passes, pages, actions, static files and the live event stream."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import asyncpg
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import compile_path
from starlette.types import Message, Receive, Scope, Send

from .._errors import DatabaseError, JobNotFound, TaskqError, WorkflowNotFound
from . import pages
from ._core import Action, BadRequest, Core, Form, NotFound, Page, Rendered, View
from ._hub import Hub
from ._render import HERE, environment
from ._security import (
    CSRF_COOKIE,
    CSRF_FIELD,
    SECURITY_HEADERS,
    Auth,
    Csrf,
    authenticate,
    challenge,
    secret_bytes,
)

if TYPE_CHECKING:
    from .._app import App

log = logging.getLogger("taskq.dashboard")

FLASH_COOKIE = "taskq_flash"
#: The largest form body accepted (a bulk action's ticked ids fit easily).
MAX_FORM_BYTES = 1 << 20
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
NAV = [
    ("overview", "Overview", "/"),
    ("jobs", "Jobs", "/jobs"),
    ("workflows", "Workflows", "/workflows"),
    ("queues", "Queues", "/queues"),
    ("cron", "Cron", "/cron"),
    ("workers", "Workers", "/workers"),
]


class _Route:
    def __init__(self, path: str, target: Page | Action) -> None:
        self.path = path
        self.target = target
        self.regex, _format, self.convertors = compile_path(path)

    def match(self, path: str) -> dict[str, Any] | None:
        found = self.regex.match(path)
        if found is None:
            return None
        return {k: self.convertors[k].convert(v) for k, v in found.groupdict().items()}


class Dashboard:
    """The taskq web dashboard, an ASGI application.

    Mount it in your web app (``api.mount("/taskq", Dashboard(jobs, auth=...))``
    in FastAPI or Starlette) or serve it alone with ``python -m taskq dashboard``.
    It opens the App on its first request if nothing else has.

    Args:
        app: the taskq App whose queue it shows.
        auth: who may use it: a callable (maybe async) taking the Starlette
            ``Request`` and returning the user, or None to refuse. Use your
            session or SSO; :func:`taskq.dashboard.basic_auth` asks for a user
            name and password; :func:`taskq.dashboard.no_auth` lets everyone
            in and has to be chosen explicitly.
        read_only: show everything, change nothing: no buttons, and every
            POST is refused. Works with a database role that can only SELECT.
        secret: signs the forms' CSRF tokens. Give the same one to every
            process serving the dashboard behind one address; by default each
            process draws its own.
        live_interval: how often open pages are refreshed when nothing was
            announced (seconds).
    """

    def __init__(
        self,
        app: App,
        *,
        auth: Auth,
        read_only: bool = False,
        secret: str | bytes | None = None,
        live_interval: float = 1.0,
    ) -> None:
        if not callable(auth):
            raise TypeError(
                "auth must be a callable taking the request and returning the user or None; "
                "use taskq.dashboard.basic_auth(...), or taskq.dashboard.no_auth to let "
                "everyone in"
            )
        if live_interval <= 0:
            raise ValueError("live_interval must be positive")
        self.app = app
        self.auth = auth
        self.read_only = bool(read_only)
        self.core = Core(app, self.read_only)
        self._csrf = Csrf(secret_bytes(secret))
        self._env = environment()
        self._pages = [_Route(p.path, p) for p in pages.all_pages()]
        self._actions = [_Route(a.path, a) for a in pages.all_actions()]
        self.hub = Hub(self._listen, interval=live_interval)
        self._open_lock = asyncio.Lock()
        self._opened = False

    # -- ASGI -------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                for key, value in SECURITY_HEADERS.items():
                    if key.encode() not in present:
                        headers.append((key.encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        request = Request(scope, receive)
        response = await self._respond(request)
        await response(scope, receive, send_secured)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def aclose(self) -> None:
        """Stop live updates and close the App if the dashboard opened it."""
        await self.hub.stop()
        if self._opened:
            self._opened = False
            await self.app.close()

    async def _ensure_open(self) -> None:
        if self.app.is_open:
            return
        async with self._open_lock:
            if not self.app.is_open:
                await self.app.open()
                self._opened = True

    async def _listen(self, callback: Callable[[str], None]) -> Callable[[], None]:
        notifier = await self.app.database.listener()
        offs = [notifier.subscribe(c, callback) for c in self.app.database.listen_channels]
        offs.append(notifier.on_reconnect(lambda: callback("")))

        def unsubscribe() -> None:
            for off in offs:
                off()

        return unsubscribe

    # -- requests ---------------------------------------------------------

    async def _respond(self, request: Request) -> Response:
        path = request.scope.get("path", "/")
        root = request.scope.get("root_path", "")
        # Starlette's Mount leaves the full path in "path" and the prefix in "root_path".
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        user = await authenticate(self.auth, request)
        if user is None:
            return self._refused(request)
        try:
            await self._ensure_open()
            if path.startswith("/static/"):
                return self._static(path.removeprefix("/static/"))
            if request.method in ("GET", "HEAD"):
                if path == "/events":
                    return await self._events(request)
                for route in self._pages:
                    params = route.match(path)
                    if params is not None:
                        assert isinstance(route.target, Page)
                        return await self._page(request, route.target, params, user)
                return self._error(request, 404, "There is no such page.", user)
            if request.method == "POST":
                for route in self._actions:
                    params = route.match(path)
                    if params is not None:
                        assert isinstance(route.target, Action)
                        return await self._act(request, route.target, params, user)
                return self._error(request, 404, "There is no such action.", user)
            return PlainText("method not allowed", 405, {"allow": "GET, HEAD, POST"})
        except (NotFound, JobNotFound, WorkflowNotFound) as exc:
            return self._error(request, 404, str(exc), user)
        except BadRequest as exc:
            return self._error(request, 400, str(exc), user)
        except (DatabaseError, asyncpg.PostgresError) as exc:
            if _privilege_refused(exc):
                message = (
                    f"The database refused: {exc}. A dashboard whose database role can only "
                    "read must be read-only (read_only=True, or --read-only)."
                )
                return self._error(request, 403, message, user)
            if isinstance(exc, asyncpg.PostgresError):
                raise
            log.warning("taskq dashboard: %s", exc)
            return self._error(request, 503, f"The database could not answer: {exc}", user)
        except TaskqError as exc:
            return self._error(request, 400, str(exc), user)

    def _refused(self, request: Request) -> Response:
        header = challenge(self.auth)
        if header is not None:
            return PlainText(
                "Sign in to see the taskq dashboard.", 401, {"www-authenticate": header}
            )
        return PlainText("You are not allowed to see the taskq dashboard.", 403)

    def _context(self, request: Request, user: Any, nav: str) -> dict[str, Any]:
        cookie = request.cookies.get(CSRF_COOKIE) or ""
        return {
            "root": request.scope.get("root_path", ""),
            "nav": NAV,
            "active": nav,
            "user": user,
            "schema": self.app.schema,
            "read_only": self.read_only,
            "can_act": not self.read_only,
            "csrf_field": CSRF_FIELD,
            "csrf_token": self._csrf.token(cookie) if cookie else "",
            "flash": _read_flash(request),
            "live": False,
            "title": "",
        }

    def _html(
        self, request: Request, template: str, context: dict[str, Any], status: int = 200
    ) -> Response:
        body = self._env.get_template(template).render(context)
        response = HTMLResponse(body, status, headers={"cache-control": "no-store"})
        if not request.cookies.get(CSRF_COOKIE):
            # Forms rendered in this response carry a token for this new cookie.
            self._set_cookie(request, response, CSRF_COOKIE, context["_new_cookie"])
        if request.cookies.get(FLASH_COOKIE):
            response.delete_cookie(FLASH_COOKIE, path=_cookie_path(request))
        return response

    def _full_context(self, request: Request, user: Any, nav: str) -> dict[str, Any]:
        context = self._context(request, user, nav)
        if not request.cookies.get(CSRF_COOKIE):
            cookie = self._csrf.new_cookie()
            context["_new_cookie"] = cookie
            context["csrf_token"] = self._csrf.token(cookie)
        return context

    async def _page(
        self, request: Request, page: Page, params: dict[str, Any], user: Any
    ) -> Response:
        view = View(self.core, params, request.query_params)
        data = await page.load(view)
        context = self._full_context(request, user, page.nav)
        context.update(data)
        context["view"] = view
        context["regions"] = page.regions
        context["live"] = bool(page.regions)
        return self._html(request, page.template, context)

    async def _events(self, request: Request) -> Response:
        target = request.query_params.get("page", "")
        parts = urlsplit(target)
        path = unquote(parts.path) or "/"
        for route in self._pages:
            params = route.match(path)
            if params is not None and isinstance(route.target, Page) and route.target.regions:
                page = route.target
                break
        else:
            return PlainText("no live page at that address", 404)
        view = View(self.core, params, QueryParams(parts.query))
        root = request.scope.get("root_path", "")

        async def render() -> dict[str, str]:
            data = await page.load(view)
            context = {
                "root": root,
                "read_only": self.read_only,
                "can_act": not self.read_only,
                "view": view,
                **data,
            }
            return {
                name: self._env.get_template(tpl).render(context)
                for name, tpl in page.regions.items()
            }

        key = path + ("?" + parts.query if parts.query else "")
        return StreamingResponse(
            self.hub.stream(key, render),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    async def _act(
        self, request: Request, action: Action, params: dict[str, Any], user: Any
    ) -> Response:
        if self.read_only:
            return self._error(request, 403, "This dashboard is read-only.", user)
        # No content type at all is an empty form (a client posting no fields):
        # the token check below refuses it like any form without a token.
        if request.headers.get("content-type", "").split(";")[0].strip() not in (
            "application/x-www-form-urlencoded",
            "",
        ):
            return self._error(request, 415, "Actions are sent as HTML forms.", user)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                return self._error(request, 413, "The form is too large.", user)
        try:
            fields = parse_qs(body.decode(), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            return self._error(request, 400, "The form is not UTF-8.", user)
        refusal = self._csrf.refusal(request, {k: v[0] for k, v in fields.items()})
        if refusal is not None:
            return self._error(request, 403, f"Refused: {refusal}.", user)
        outcome = await action.handle(Form(self.core, params, fields, user))
        if isinstance(outcome, Rendered):
            context = self._full_context(request, user, outcome.nav)
            context.update(outcome.context)
            return self._html(request, outcome.template, context, outcome.status)
        location = request.scope.get("root_path", "") + _safe_location(outcome.location)
        response = RedirectResponse(location, status_code=303)
        flash = ("ok:" if outcome.ok else "bad:") + outcome.message
        self._set_cookie(request, response, FLASH_COOKIE, quote(flash[:500]))
        return response

    def _error(self, request: Request, status: int, message: str, user: Any) -> Response:
        context = self._full_context(request, user, "")
        context.update(status=status, message=message)
        return self._html(request, "error.html", context, status)

    def _set_cookie(self, request: Request, response: Response, name: str, value: str) -> None:
        response.set_cookie(
            name,
            value,
            path=_cookie_path(request),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    @staticmethod
    def _static(name: str) -> Response:
        if not re.fullmatch(r"[a-z0-9_-]+\.(css|js)", name):
            return PlainText("no such file", 404)
        path = HERE / "static" / name
        if not path.is_file():
            return PlainText("no such file", 404)
        return Response(
            path.read_bytes(),
            media_type=STATIC_TYPES[path.suffix],
            headers={"cache-control": "max-age=300"},
        )


class PlainText(Response):
    media_type = "text/plain; charset=utf-8"

    def __init__(self, text: str, status: int, headers: dict[str, str] | None = None) -> None:
        super().__init__(text, status, headers)


def _privilege_refused(exc: BaseException | None) -> bool:
    """Whether the database role lacked a privilege (the cause of a taskq error too)."""
    while exc is not None:
        if isinstance(exc, asyncpg.InsufficientPrivilegeError):
            return True
        exc = exc.__cause__
    return False


def _cookie_path(request: Request) -> str:
    return request.scope.get("root_path", "") or "/"


def _safe_location(location: str) -> str:
    """A redirect stays inside the dashboard: a path, never another site."""
    if not location.startswith("/") or location.startswith("//") or "\\" in location:
        return "/"
    return location


def _read_flash(request: Request) -> dict[str, Any] | None:
    raw = request.cookies.get(FLASH_COOKIE)
    if not raw:
        return None
    text = unquote(raw)
    kind, _, message = text.partition(":")
    return {"ok": kind == "ok", "message": message}
