"""aiohttp routes of the control API (schema: protocol.py, openapi.yaml).

Handlers only parse and validate; the daemon does the work. Any bad request
gets a 4xx JSON body that names the problem; nothing a client sends can reach
a 5xx except a bug, and even then the daemon stays up.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from hivemindd.protocol import MAX_BODY_BYTES, ROUTES, JoinRequest, RequestError, parse_empty, parse_log_query

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Controller(Protocol):
    """What the API needs from the daemon."""

    def status(self) -> dict[str, Any]: ...
    def peers(self) -> list[dict[str, Any]]: ...
    async def join(self, request: JoinRequest) -> dict[str, Any]: ...
    async def leave(self) -> dict[str, Any]: ...
    async def pause(self) -> dict[str, Any]: ...
    async def resume(self) -> dict[str, Any]: ...
    def logs(self, n: int, after: int | None) -> dict[str, Any]: ...


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda o: json.dumps(o, indent=None))


async def _read_body(request: web.Request) -> Any:
    if not request.can_read_body:
        return None
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise RequestError(f"request body over {MAX_BODY_BYTES} bytes", status=413, code="too_large")
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from None


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RequestError as exc:
        return _json(exc.to_body(), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = "no such endpoint" if exc.status == 404 else exc.reason
        routes = ", ".join(f"{r.method} {r.path}" for r in ROUTES.values())
        return _json({"error": {"code": "http_" + str(exc.status), "message": f"{reason} (routes: {routes})"}},
                     status=exc.status)


def build_app(daemon: Controller) -> web.Application:
    async def status(_: web.Request) -> web.Response:
        return _json(daemon.status())

    async def peers(_: web.Request) -> web.Response:
        return _json(daemon.peers())

    async def join(request: web.Request) -> web.Response:
        return _json(await daemon.join(JoinRequest.parse(await _read_body(request))))

    def simple(action: Callable[[], Awaitable[dict[str, Any]]]) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            parse_empty(await _read_body(request))
            return _json(await action())
        return handler

    async def logs(request: web.Request) -> web.Response:
        n, after = parse_log_query(dict(request.query))
        return _json(daemon.logs(n, after))

    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY_BYTES)
    handlers: dict[str, Handler] = {
        "status": status, "peers": peers, "join": join, "logs": logs,
        "leave": simple(daemon.leave), "pause": simple(daemon.pause), "resume": simple(daemon.resume),
    }
    for name, route in ROUTES.items():
        app.router.add_route(route.method, route.path, handlers[name])
    return app
