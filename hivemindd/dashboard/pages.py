"""The dashboard's routes: ``GET /`` (the page) and ``GET /static/<file>`` (its script, styles and uPlot).

Everything the page needs ships in ``static/``: no build step, nothing fetched from
a CDN (a host in a training cluster often has no internet). On the loopback TCP
listener, ``GET /?token=<token>`` trades the token for an HttpOnly, SameSite=Strict
session cookie and redirects to ``/``, so the token leaves the address bar and the
page's script never sees it (see api.token_guard for what the cookie may do).
"""

from __future__ import annotations

import hmac
from pathlib import Path

from aiohttp import web

from hivemindd.protocol import RequestError

STATIC = Path(__file__).with_name("static")
COOKIE = "hivemindd_token"
CONTROL_HEADER = "X-Hivemindd-Dashboard"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".md": "text/plain; charset=utf-8", ".LICENSE": "text/plain; charset=utf-8"}
# The page loads only its own files and talks only to this origin.
_SECURITY = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _file(name: str) -> web.Response:
    path = STATIC / name
    if "/" in name or name.startswith(".") or not path.is_file():
        raise web.HTTPNotFound()
    content_type = _TYPES.get(path.suffix, "application/octet-stream")
    return web.Response(body=path.read_bytes(), headers={**_SECURITY, "Content-Type": content_type})


def add_routes(app: web.Application, token: str | None) -> None:
    async def index(request: web.Request) -> web.StreamResponse:
        given = request.query.get("token")
        if given is not None:
            if token is None:  # the unix socket needs no token: just drop it
                raise web.HTTPSeeOther("/")
            if not hmac.compare_digest(given.encode(errors="replace"), token.encode()):
                raise RequestError("wrong token in ?token=; use the one in the daemon's http.token file",
                                   field="token", status=401, code="unauthorized")
            response = web.HTTPSeeOther("/")
            response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/")
            response.headers.update(_SECURITY)
            raise response
        for key in request.query:
            raise RequestError(f"unknown query parameter {key[:40]!r} (allowed: token)", field=key[:64])
        return _file("index.html")

    async def static(request: web.Request) -> web.StreamResponse:
        return _file(request.match_info["name"])

    app.router.add_get("/", index, name="dashboard")
    app.router.add_get("/static/{name}", static, name="dashboard_static")
