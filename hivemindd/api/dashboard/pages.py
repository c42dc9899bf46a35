"""The dashboard's routes: ``GET /`` (the page) and ``GET /static/<file>`` (its script, styles and uPlot).

Everything the page needs ships in ``static/``: no build step, nothing fetched from
a CDN (a host in a training cluster often has no internet). On the loopback TCP
listener, ``GET /?token=<token>`` trades the token for a new dashboard session
(auth.DashboardSession): its random id in an HttpOnly, SameSite=Strict cookie, and
its control key in the fragment of the redirect to ``/#<key>``, which the page's
script keeps in the tab's sessionStorage and sends back in the ``X-Hivemindd-Dashboard``
header. The token leaves the address bar, the page never sees it, and the cookie is
never the token (see api.token_guard for what the cookie alone may do).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from hivemindd.api.auth import LoopbackSecrets
from hivemindd.wire.protocol import RequestError

STATIC = Path(__file__).with_name("static")
COOKIE = "hivemindd_session"  # a session id, never the token (an old "hivemindd_token" cookie is ignored)
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


def add_routes(app: web.Application, loopback: LoopbackSecrets | None) -> None:
    async def index(request: web.Request) -> web.StreamResponse:
        given = request.query.get("token")
        if given is not None:
            if loopback is None:  # the unix socket needs no token: just drop it
                raise web.HTTPSeeOther("/")
            if not loopback.is_token(given):
                raise RequestError(f"wrong token in ?token=; use the one in {loopback.token_file}",
                                   field="token", status=401, code="unauthorized")
            session = loopback.open_session()
            response = web.HTTPSeeOther("/#" + session.control_key)
            response.set_cookie(COOKIE, session.id, httponly=True, samesite="Strict", path="/",
                                max_age=str(int(loopback.ttl_s)))
            response.headers.update(_SECURITY)
            raise response
        for key in request.query:
            raise RequestError(f"unknown query parameter {key[:40]!r} (allowed: token)", field=key[:64])
        return _file("index.html")

    async def static(request: web.Request) -> web.StreamResponse:
        return _file(request.match_info["name"])

    app.router.add_get("/", index, name="dashboard")
    app.router.add_get("/static/{name}", static, name="dashboard_static")
