"""aiohttp routes of the control API (schema: protocol.py, openapi.yaml).

Handlers only parse and validate; the daemon does the work. Any bad request
gets a 4xx JSON body that names the problem; nothing a client sends can reach
a 5xx except a bug, and even then the daemon stays up.

Every request passes a guard first: on the unix socket it asks the kernel who
the caller is (auth.py), on the optional loopback TCP listener it checks the
bearer token. Read-only callers may use the routes marked ``read_only``.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog
from aiohttp import web

from hivemindd.auth import Access, Authorizer, PeerCredentials, identity_check_available, peer_credentials
from hivemindd.dashboard import pages
from hivemindd.protocol import (
    MAX_BODY_BYTES,
    MAX_IMAGE_BYTES,
    ROUTES,
    HistoryQuery,
    JoinRequest,
    LogQuery,
    PauseRequest,
    RequestError,
    parse_empty,
    parse_no_query,
    parse_predict_query,
)

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Decides what a request may do, or raises RequestError (401) when it is not even authenticated.
Guard = Callable[[web.Request], "Grant"]


class Grant:
    """The outcome of a guard: the access level and, for a refusal, what to tell the caller."""

    def __init__(self, access: Access, refusal: str = "") -> None:
        self.access = access
        self.refusal = refusal


class Controller(Protocol):
    """What the API needs from the daemon."""

    def status(self) -> dict[str, Any]: ...
    def peers(self) -> list[dict[str, Any]]: ...
    async def join(self, request: JoinRequest) -> dict[str, Any]: ...
    async def leave(self) -> dict[str, Any]: ...
    async def pause(self, request: PauseRequest) -> dict[str, Any]: ...
    async def resume(self) -> dict[str, Any]: ...
    def logs(self, query: LogQuery) -> dict[str, Any]: ...
    def swarm(self) -> dict[str, Any]: ...
    def history(self, query: HistoryQuery) -> dict[str, Any]: ...
    def metrics(self) -> dict[str, Any]: ...
    async def predict(self, image: bytes, checkpoint: str, top: int) -> dict[str, Any]: ...


def peer_guard(authorizer: Authorizer) -> Guard:
    """Unix socket: the caller's uid and groups from the kernel decide; unknown platforms rely on 0660."""
    checked = identity_check_available()

    def guard(request: web.Request) -> Grant:
        if not checked:
            return Grant(Access.FULL)  # the socket is 0660: whoever got in passed the file permissions
        sock = request.transport.get_extra_info("socket") if request.transport is not None else None
        creds: PeerCredentials | None = None
        try:
            if sock is None:
                raise OSError("no socket")
            creds = peer_credentials(sock)
            access = authorizer.access(creds)
        except OSError as exc:  # never guess an identity: fall back to the least
            log.warning("api.peer_credentials_failed", error=str(exc))
            access = Access.READ
        return Grant(access, "" if access is Access.FULL else authorizer.refusal(creds))

    return guard


def token_guard(token: str, token_file: str) -> Guard:
    """Loopback TCP: a bearer token (compared in constant time) gives full control; nothing else gets in.

    The dashboard's browser carries the token in a cookie instead (set by ``GET /?token=…``).
    A browser attaches that cookie to requests other pages on this machine make too
    (another port on 127.0.0.1 is the same site), so on its own the cookie only reads;
    control also needs the ``X-Hivemindd-Dashboard`` header, which a cross-origin page
    cannot send without a CORS preflight that this server never grants.
    """
    expected = f"Bearer {token}".encode()
    secret = token.encode()

    def guard(request: web.Request) -> Grant:
        given = request.headers.get("Authorization", "").encode(errors="replace")
        if given and hmac.compare_digest(given, expected):
            return Grant(Access.FULL)
        cookie = request.cookies.get(pages.COOKIE, "").encode(errors="replace")
        if not given and cookie and hmac.compare_digest(cookie, secret):
            same_origin = request.headers.get(pages.CONTROL_HEADER) == "1"
            return Grant(Access.FULL if same_origin else Access.READ,
                         f"the dashboard cookie alone only reads; send the {pages.CONTROL_HEADER}: 1 header "
                         "or the bearer token")
        if not given and request.path == "/" and "token" in request.query:
            return Grant(Access.READ)  # the index handler checks it and trades it for the cookie
        what = "a wrong" if given else "no"
        raise RequestError(f"{what} bearer token: send `Authorization: Bearer <token>` with the token in "
                           f"{token_file} (in a browser: open /?token=<token> once)", status=401, code="unauthorized")

    return guard


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda o: json.dumps(o, indent=None))


async def _read_body(request: web.Request) -> Any:
    if not request.can_read_body:
        return None
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise RequestError(f"request body over {MAX_BODY_BYTES} bytes", status=413, code="too_large")
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise RequestError(f"request body over {MAX_BODY_BYTES} bytes", status=413, code="too_large")
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise RequestError(f"request body is not valid JSON: {str(exc)[:200]}") from None


def _error_middleware(guard: Guard) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            grant = guard(request)
            route = request.match_info.route.name
            if route in ROUTES and not ROUTES[route].read_only and grant.access is not Access.FULL:
                raise RequestError(grant.refusal, status=403, code="forbidden")
            return await handler(request)
        except RequestError as exc:
            response = _json(exc.to_body(), status=exc.status)
            if exc.status == 401:
                response.headers["WWW-Authenticate"] = "Bearer"
            return response
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            reason = "no such endpoint" if exc.status == 404 else exc.reason
            routes = ", ".join(f"{r.method} {r.path}" for r in ROUTES.values())
            return _json({"error": {"code": "http_" + str(exc.status), "message": f"{reason} (routes: {routes})"}},
                         status=exc.status)
        except Exception:  # a bug: say so as JSON and keep serving
            log.exception("api.handler_failed", method=request.method, path=request.path)
            return _json({"error": {"code": "internal", "message": "internal error; see the daemon's log"}},
                         status=500)
    return middleware


async def _read_image(request: web.Request) -> bytes:
    """The raw request body, at most MAX_IMAGE_BYTES."""
    limit = MAX_IMAGE_BYTES
    if request.content_length is not None and request.content_length > limit:
        raise RequestError(f"image over {limit >> 20} MiB", status=413, code="too_large")
    raw = await request.content.read(limit + 1) if request.can_read_body else b""
    if len(raw) > limit:
        raise RequestError(f"image over {limit >> 20} MiB", status=413, code="too_large")
    return raw


def build_app(daemon: Controller, guard: Guard, token: str | None = None) -> web.Application:
    """The API, the dashboard page and /metrics; ``token`` (TCP only) lets ``GET /?token=`` set the cookie."""
    async def status(request: web.Request) -> web.Response:
        parse_no_query(dict(request.query))
        return _json(daemon.status())

    async def peers(request: web.Request) -> web.Response:
        parse_no_query(dict(request.query))
        return _json(daemon.peers())

    async def join(request: web.Request) -> web.Response:
        parse_no_query(dict(request.query))
        return _json(await daemon.join(JoinRequest.parse(await _read_body(request))))

    async def pause(request: web.Request) -> web.Response:
        parse_no_query(dict(request.query))
        return _json(await daemon.pause(PauseRequest.parse(await _read_body(request))))

    def simple(action: Callable[[], Awaitable[dict[str, Any]]]) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            parse_no_query(dict(request.query))
            parse_empty(await _read_body(request))
            return _json(await action())
        return handler

    async def logs(request: web.Request) -> web.Response:
        return _json(daemon.logs(LogQuery.parse(dict(request.query))))

    async def swarm(request: web.Request) -> web.Response:
        parse_no_query(dict(request.query))
        return _json(daemon.swarm())

    async def history(request: web.Request) -> web.Response:
        return _json(daemon.history(HistoryQuery.parse(dict(request.query))))

    async def metrics(request: web.Request) -> web.Response:
        parse_no_query(dict(request.query))
        from hivemindd.metrics_export import CONTENT_TYPE, render  # prometheus-client: only when scraped

        response = web.Response(body=render(daemon.metrics()))
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    async def predict(request: web.Request) -> web.Response:
        checkpoint, top = parse_predict_query(dict(request.query))
        return _json(await daemon.predict(await _read_image(request), checkpoint, top))

    app = web.Application(middlewares=[_error_middleware(guard)], client_max_size=MAX_BODY_BYTES)
    handlers: dict[str, Handler] = {
        "status": status, "peers": peers, "join": join, "logs": logs, "pause": pause,
        "leave": simple(daemon.leave), "resume": simple(daemon.resume),
        "swarm": swarm, "history": history, "metrics": metrics, "predict": predict,
    }
    for name, route in ROUTES.items():
        app.router.add_route(route.method, route.path, handlers[name], name=name)
    pages.add_routes(app, token)
    return app
