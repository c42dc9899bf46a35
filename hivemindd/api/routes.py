"""aiohttp routes of the control API (schema: protocol.py, openapi.yaml).

Handlers only parse and validate; the daemon does the work. Any bad request
gets a 4xx JSON body that names the problem; nothing a client sends can reach
a 5xx except a bug, and even then the daemon stays up.

Every request passes a guard first: on the unix socket it asks the kernel who
the caller is (auth.py), on the optional loopback TCP listener it checks the
bearer token or a dashboard session. Read-only callers may use the routes marked
``read_only``, and see nothing of the logs there (``/v1/status`` leaves out the
trainer's error lines for them). Bodies are read whole, within a size limit and a
time limit; connections are capped and timed by connections.py.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog
from aiohttp import web

from hivemindd.api.auth import (
    Access,
    Authorizer,
    LoopbackSecrets,
    PeerCredentials,
    identity_check_available,
    peer_credentials,
)
from hivemindd.api.connections import ConnectionGate
from hivemindd.api.dashboard import pages
from hivemindd.wire.protocol import (
    MAX_BODY_BYTES,
    MAX_IMAGE_BYTES,
    MAX_NESTING,
    ROUTES,
    HistoryQuery,
    JoinRequest,
    LogQuery,
    PauseRequest,
    RequestError,
    parse_empty,
    parse_no_query,
    parse_predict_query,
    too_deep,
)

log = structlog.get_logger(__name__)

BODY_TIMEOUT_S = 60.0  # 8 MiB over a local socket takes milliseconds; a trickle must not hold a handler for ever
# Where the middleware leaves the guard's decision for the handlers (typed keys since aiohttp 3.13).
ACCESS: Any = web.RequestKey("hivemindd_access", Access) if hasattr(web, "RequestKey") else "hivemindd_access"

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


def token_guard(loopback: LoopbackSecrets) -> Guard:
    """Loopback TCP: the bearer token (compared in constant time) gives full control; so does a dashboard session
    whose control key comes with it.

    The dashboard's browser holds a session (made by ``GET /?token=…``, see pages.py), never the
    token: its id in a cookie, its control key in the ``X-Hivemindd-Dashboard`` header. A browser
    sends the cookie to every port of this host, so another local web server may learn the id;
    the key it cannot learn (the tab's sessionStorage is this origin's alone). So the cookie alone
    only reads, which any local user may do on the unix socket anyway. A session id is never a
    bearer token, and a session ends when it expires, when the daemon restarts or when the token
    file gets a new token.
    """

    def guard(request: web.Request) -> Grant:
        given = request.headers.get("Authorization", "")
        if given:
            scheme, _, value = given.partition(" ")
            if scheme == "Bearer" and loopback.is_token(value):
                return Grant(Access.FULL)
        elif request.path == "/" and "token" in request.query:
            return Grant(Access.READ)  # the index handler checks it and trades it for a session (stale cookie or not)
        elif session_id := request.cookies.get(pages.COOKIE, ""):
            session = loopback.session(session_id)
            if session is None:
                raise RequestError("the dashboard session has expired or ended (the daemon restarted, or its token "
                                   f"changed): open /?token=<the token in {loopback.token_file}> again",
                                   status=401, code="unauthorized")
            key = request.headers.get(pages.CONTROL_HEADER, "")
            if hmac.compare_digest(key.encode(errors="replace"), session.control_key.encode()):
                return Grant(Access.FULL)
            return Grant(Access.READ, "a dashboard session cookie alone only reads; control needs the page opened "
                                      f"through /?token=… in this tab (its {pages.CONTROL_HEADER} key) or the bearer token")
        what = "a wrong" if given else "no"
        raise RequestError(f"{what} bearer token: send `Authorization: Bearer <token>` with the token in "
                           f"{loopback.token_file} (in a browser: open /?token=<token> once)", status=401,
                           code="unauthorized")

    return guard


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda o: json.dumps(o, indent=None))


async def _read_whole(request: web.Request, limit: int, what: str) -> bytes:
    """The whole body, or RequestError: 413 past ``limit`` bytes, 408 when it does not arrive in time.

    ``request.content.read(n)`` would return only what has arrived so far.
    """
    too_large = RequestError(f"{what} over {_size(limit)}", status=413, code="too_large")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    if not request.can_read_body:
        return b""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(f"{what} not complete after {BODY_TIMEOUT_S:.0f} s ({size} bytes came)", status=408,
                           code="request_timeout") from None
    return b"".join(chunks)


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n % (1 << 20) == 0 else f"{n} bytes"


async def _read_body(request: web.Request) -> Any:
    raw = await _read_whole(request, MAX_BODY_BYTES, "request body")
    if not raw.strip():
        return None
    too_deep_error = RequestError(f"request body nests lists and objects more than {MAX_NESTING} levels deep")
    try:
        body = json.loads(raw)
    except RecursionError:  # valid JSON, only deeper than this thread's stack allows: the same refusal
        raise too_deep_error from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"request body is not valid JSON: {str(exc)[:200]}") from None
    if too_deep(body):
        raise too_deep_error
    return body


def _error_middleware(guard: Guard, gate: ConnectionGate | None) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if gate is not None:
            gate.request_started(request)
        try:
            grant = guard(request)
            request[ACCESS] = grant.access
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
        except RecursionError:  # nesting a parser let through (a spec's TOML, a published spec.json): the input's fault
            log.warning("api.nested_too_deeply", method=request.method, path=request.path)
            return _json({"error": {"code": "too_deep", "message": "the request, or the run spec it names, nests "
                                    f"lists or tables too deeply (at most {MAX_NESTING} levels)"}}, status=400)
        except Exception:  # a bug: say so as JSON and keep serving
            log.exception("api.handler_failed", method=request.method, path=request.path)
            return _json({"error": {"code": "internal", "message": "internal error; see the daemon's log"}},
                         status=500)
    return middleware


async def _read_image(request: web.Request) -> bytes:
    """The raw request body, at most MAX_IMAGE_BYTES."""
    return await _read_whole(request, MAX_IMAGE_BYTES, "image")


def for_reader(status: dict[str, Any]) -> dict[str, Any]:
    """``status`` as a caller without operator rights sees it: no log lines (``/v1/logs`` is closed to them too)."""
    trainer = status.get("trainer")
    if isinstance(trainer, dict) and trainer.get("error_lines"):
        status = {**status, "trainer": {**trainer, "error_lines": [], "error_lines_withheld": True}}
    return status


def build_app(daemon: Controller, guard: Guard, loopback: LoopbackSecrets | None = None,
              gate: ConnectionGate | None = None) -> web.Application:
    """The API, the dashboard page and /metrics.

    ``loopback`` (TCP only) lets ``GET /?token=`` open dashboard sessions; ``gate``, when the
    listener has one, learns here that a connection has delivered a request.
    """
    async def status(request: web.Request) -> web.Response:
        parse_no_query(dict(request.query))
        body = daemon.status()
        return _json(body if request.get(ACCESS) is Access.FULL else for_reader(body))

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
        from hivemindd.api.metrics_export import CONTENT_TYPE, render  # prometheus-client: only when scraped

        response = web.Response(body=render(daemon.metrics()))
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    async def predict(request: web.Request) -> web.Response:
        checkpoint, top = parse_predict_query(dict(request.query))
        return _json(await daemon.predict(await _read_image(request), checkpoint, top))

    app = web.Application(middlewares=[_error_middleware(guard, gate)], client_max_size=MAX_IMAGE_BYTES)
    handlers: dict[str, Handler] = {
        "status": status, "peers": peers, "join": join, "logs": logs, "pause": pause,
        "leave": simple(daemon.leave), "resume": simple(daemon.resume),
        "swarm": swarm, "history": history, "metrics": metrics, "predict": predict,
    }
    for name, route in ROUTES.items():
        app.router.add_route(route.method, route.path, handlers[name], name=name)
    pages.add_routes(app, loopback)
    return app
