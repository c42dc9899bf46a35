"""How many connections one caller may hold open to the control API, and how long one may wait for a request.

The unix socket is world-connectable (auth.py checks each request), so any local user
can open connections to it. Left alone, an idle or half-sent one stays open for
aiohttp's keep-alive time (an hour), and a few hundred of them use up the daemon's file
descriptors: then accept() fails with EMFILE and the owner's own requests go unanswered.
``ConnectionGate`` closes a connection that has not delivered a whole request head within
``header_timeout_s`` of connecting (aiohttp's keep-alive timer, ``IDLE_TIMEOUT_S``, covers
the wait between requests on one connection), and answers 429 to a caller that
already holds ``per_caller`` open connections: per uid on the unix socket, per listener
on loopback TCP, where the kernel does not say who is calling.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web

from hivemindd.api.auth import peer_credentials

log = structlog.get_logger(__name__)

HEADER_TIMEOUT_S = 10.0  # a local client sends its request head in milliseconds
IDLE_TIMEOUT_S = 2 * HEADER_TIMEOUT_S  # aiohttp's keep-alive: between requests, and a backstop for the first
MAX_CONNECTIONS_PER_UID = 64  # hmctl uses one at a time; a browser about six
MAX_TCP_CONNECTIONS = 128

Caller = int | None  # a uid; None where the kernel does not say (TCP, a failed lookup)


def unix_caller(transport: asyncio.BaseTransport) -> Caller:
    """The uid at the other end of a unix-socket connection, or None when the kernel will not say."""
    sock = transport.get_extra_info("socket")
    try:
        return None if sock is None else peer_credentials(sock).uid
    except OSError:
        return None


def no_caller(transport: asyncio.BaseTransport) -> Caller:
    """TCP: no uid to tell callers apart, so all share one budget."""
    return None


def _answer(status: int, reason: str, code: str, message: str) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class ConnectionGate:
    """Counts each listener's open connections per caller and ends those that send no request in time."""

    def __init__(self, caller_of: Callable[[asyncio.BaseTransport], Caller], per_caller: int,
                 header_timeout_s: float = HEADER_TIMEOUT_S) -> None:
        self._caller_of = caller_of
        self.per_caller = per_caller
        self.header_timeout_s = header_timeout_s
        self._open: Counter[Caller] = Counter()
        self._callers: dict[object, Caller] = {}  # handler → caller, for connections counted in _open
        self._timers: dict[object, asyncio.TimerHandle] = {}  # handler → its header deadline, until a request
        self.refused = 0
        self.timed_out = 0

    def install(self, runner: web.AppRunner) -> None:
        """Hook into the connection callbacks of a runner's server (after ``setup()``, before any site starts)."""
        server = runner.server
        assert server is not None, "install the gate after runner.setup()"
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            made(handler, transport)
            self._admit(handler, transport)

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            self._release(handler)
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    def request_started(self, request: web.BaseRequest) -> None:
        """A whole request head arrived on this connection: its header deadline no longer applies."""
        timer = self._timers.pop(request.protocol, None)
        if timer is not None:
            timer.cancel()

    def open_connections(self) -> dict[Caller, int]:
        return dict(self._open)

    def _admit(self, handler: object, transport: asyncio.Transport) -> None:
        caller = self._caller_of(transport)
        if self._open[caller] >= self.per_caller:
            self.refused += 1
            who = "this listener" if caller is None else f"uid {caller}"
            if self.refused == 1 or self.refused % 1000 == 0:  # a flood must not flood the log as well
                log.warning("api.connections_refused", caller=caller, open=self._open[caller], refused=self.refused)
            transport.write(_answer(429, "Too Many Requests", "too_many_connections",
                                    f"{who} already holds {self._open[caller]} open connections to hivemindd "
                                    f"(at most {self.per_caller}); close some and retry"))
            transport.close()
            return
        self._open[caller] += 1
        self._callers[handler] = caller
        loop = asyncio.get_running_loop()
        self._timers[handler] = loop.call_later(self.header_timeout_s, self._expire, handler, transport)

    def _expire(self, handler: object, transport: asyncio.Transport) -> None:
        self._timers.pop(handler, None)
        if transport.is_closing():
            return
        self.timed_out += 1
        transport.write(_answer(408, "Request Timeout", "request_timeout",
                                f"no complete request within {self.header_timeout_s:.0f} s of connecting"))
        transport.close()

    def _release(self, handler: object) -> None:
        timer = self._timers.pop(handler, None)
        if timer is not None:
            timer.cancel()
        if handler in self._callers:
            caller = self._callers.pop(handler)
            self._open[caller] -= 1
            if self._open[caller] <= 0:
                del self._open[caller]
