"""What a hostile or clumsy local client cannot do to the control API (issue 11, items 5, 9, 10, 14).

The API's own logic runs in-process against a stub daemon on a real unix socket (bodies
sent in pieces, a read-only guard, a connection gate with small limits); the rest runs
against real daemons: idle and surplus connections from another uid, the dashboard's
session on the loopback listener, the raised open-file limit, and error lines withheld
from read-only users.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import resource
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from hivemindd.api.auth import Access, Authorizer
from hivemindd.api.connections import ConnectionGate, unix_caller
from hivemindd.api.routes import Grant, build_app, peer_guard
from hivemindd.wire.protocol import MAX_BODY_BYTES, MAX_IMAGE_BYTES, RequestError
from tests.support.daemons import DaemonProcess, daemon_at
from tests.support.dirs import short_dir
from tests.support.repo import check_schema
from tests.support.specs import spec_toml
from tests.support.users import IS_ROOT, STRANGER, as_user
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(240)


# --- the API in-process, against a stub daemon ------------------------------------------------

class StubDaemon:
    """Just enough of the daemon: a status with error lines, and a predict that reports what it got."""

    def __init__(self) -> None:
        self.images: list[int] = []

    def status(self) -> dict[str, Any]:
        return {"peer_id": "Qm", "run_id": "r", "paused": False, "pause": None, "peers": 0, "discovery": {},
                "maddrs": [], "version": "0", "hostname": "h",
                "trainer": {"state": "crashloop", "pid": None, "restarts": 5, "step": None, "epoch": None,
                            "checkpoint_step": None, "last_error": "trainer exited with code 1",
                            "error_lines": ["Traceback (most recent call last):", "OSError: /home/owner/secret"]}}

    async def join(self, request: Any) -> dict[str, Any]:
        raise RequestError("stub", field="stub")

    async def predict(self, image: bytes, checkpoint: str, top: int) -> dict[str, Any]:
        self.images.append(len(image))
        return {"size": len(image)}

    async def leave(self) -> dict[str, Any]:
        raise RequestError("stub")

    resume = leave


@asynccontextmanager
async def served(app: web.Application, path: Path, gate: ConnectionGate | None = None,
                 keepalive_timeout: float = 75.0) -> AsyncIterator[None]:
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=keepalive_timeout)
    await runner.setup()
    if gate is not None:
        gate.install(runner)
    try:
        await web.UnixSite(runner, str(path)).start()
        yield
    finally:
        await runner.cleanup()


async def exchange_in_pieces(path: Path, head: bytes, body: bytes, pieces: int = 4) -> tuple[int, dict[str, Any]]:
    """Send ``head`` and then ``body`` in ``pieces`` parts, yielding to the server between them."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(head)
        step = max(1, -(-len(body) // pieces))
        for start in range(0, len(body), step):
            writer.write(body[start:start + step])
            await writer.drain()
            await asyncio.sleep(0.2)  # the server has long run the handler: it must wait for the rest
        reply = await asyncio.wait_for(reader.read(), 60)
    finally:
        writer.close()
        with suppress(ConnectionError):
            await writer.wait_closed()
    status_line, _, rest = reply.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def post_head(path: str, length: int) -> bytes:
    return f"POST {path} HTTP/1.0\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode()


def full_access(request: web.Request) -> Grant:
    return Grant(Access.FULL)


def test_an_image_that_arrives_in_pieces_is_read_whole(short_tmp: Path) -> None:
    stub = StubDaemon()
    sock = short_tmp / "api.sock"

    async def main() -> None:
        async with served(build_app(stub, full_access), sock):  # type: ignore[arg-type]
            for size in (512 * 1024, 2 << 20, MAX_IMAGE_BYTES):
                image = os.urandom(size)
                status, body = await exchange_in_pieces(sock, post_head("/v1/predict", size), image)
                assert (status, body) == (200, {"size": size})
            status, body = await exchange_in_pieces(sock, post_head("/v1/predict", MAX_IMAGE_BYTES + 1),
                                                    b"x" * (MAX_IMAGE_BYTES + 1))
            assert status == 413 and body["error"]["code"] == "too_large" and "8 MiB" in body["error"]["message"]

    asyncio.run(main())
    assert stub.images == [512 * 1024, 2 << 20, MAX_IMAGE_BYTES]  # every byte, every time


def test_a_json_body_that_arrives_in_pieces_is_parsed_whole(short_tmp: Path) -> None:
    sock = short_tmp / "api.sock"
    padding = "#" * (900 * 1024)
    body = json.dumps({"run_id": "ok", "spec_toml": padding}).encode()

    async def main() -> None:
        async with served(build_app(StubDaemon(), full_access), sock):  # type: ignore[arg-type]
            status, reply = await exchange_in_pieces(sock, post_head("/v1/join", len(body)), body)
            assert (status, reply["error"].get("field")) == (400, "stub"), reply  # it reached the daemon
            exact = json.dumps({"run_id": "ok", "spec_toml": ""}).encode()
            exact = exact[:-2] + b" " * (MAX_BODY_BYTES - len(exact)) + exact[-2:]
            assert len(exact) == MAX_BODY_BYTES
            status, reply = await exchange_in_pieces(sock, post_head("/v1/join", len(exact)), exact)
            assert reply["error"].get("field") == "stub", reply  # at the limit: accepted
            status, reply = await exchange_in_pieces(sock, post_head("/v1/join", len(exact) + 1), exact + b" ")
            assert status == 413 and "1 MiB" in reply["error"]["message"]

    asyncio.run(main())


def test_read_only_callers_get_no_log_lines_in_status(short_tmp: Path) -> None:
    sock = short_tmp / "api.sock"

    def read_only(request: web.Request) -> Grant:
        return Grant(Access.READ, "read only here")

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async with served(build_app(StubDaemon(), read_only), sock):  # type: ignore[arg-type]
            _, reader_view = await exchange_in_pieces(sock, b"GET /v1/status HTTP/1.0\r\n\r\n", b"")
            status, refused = await exchange_in_pieces(sock, b"GET /v1/logs HTTP/1.0\r\n\r\n", b"")
            assert status == 403 and refused["error"]["code"] == "forbidden"
        async with served(build_app(StubDaemon(), full_access), sock):  # type: ignore[arg-type]
            _, operator_view = await exchange_in_pieces(sock, b"GET /v1/status HTTP/1.0\r\n\r\n", b"")
        return reader_view, operator_view

    reader_view, operator_view = asyncio.run(main())
    check_schema(reader_view["trainer"], "Trainer")
    assert reader_view["trainer"]["error_lines"] == [] and reader_view["trainer"]["error_lines_withheld"] is True
    assert reader_view["trainer"]["last_error"] == "trainer exited with code 1"  # the one-line summary stays
    assert operator_view["trainer"]["error_lines"][-1] == "OSError: /home/owner/secret"
    assert "error_lines_withheld" not in operator_view["trainer"]


def test_the_gate_caps_connections_per_caller_and_ends_idle_ones(short_tmp: Path) -> None:
    sock = short_tmp / "api.sock"
    gate = ConnectionGate(unix_caller, per_caller=5, header_timeout_s=1.0)
    app = build_app(StubDaemon(), peer_guard(Authorizer()), gate=gate)  # type: ignore[arg-type]

    async def main() -> None:
        async with served(app, sock, gate, keepalive_timeout=1.0):
            idle = [await asyncio.open_unix_connection(str(sock)) for _ in range(8)]
            replies = [await asyncio.wait_for(reader.read(), 30) for reader, _ in idle]  # all end, none hangs
            refused = [r for r in replies if b" 429 " in r.split(b"\r\n", 1)[0]]
            timed_out = [r for r in replies if b" 408 " in r.split(b"\r\n", 1)[0]]
            assert len(refused) == 3 and len(timed_out) == 5, replies
            assert b"at most 5" in refused[0] and b"uid" in refused[0]
            assert gate.open_connections() == {}  # every slot given back
            for _, writer in idle:
                writer.close()
            # A request head sent in time is answered, and a slow handler is not cut off by the deadline.
            status, body = await exchange_in_pieces(sock, b"GET /v1/status HTTP/1.0\r\n\r\n", b"")
            assert status == 200 and body["peer_id"] == "Qm"

    asyncio.run(main())


# --- real daemons -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world() -> Iterator[Path]:
    with short_dir("hmh") as root:
        os.chmod(root, 0o755)  # other users must reach the socket
        (root / "run").mkdir(mode=0o755)
        yield root


@pytest.fixture(scope="module")
def daemon(world: Path) -> Iterator[DaemonProcess]:
    socket_path = world / "run" / "hm.sock"  # in a folder others can reach, as systemd's RuntimeDirectory
    with daemon_at(world / "state", "--http", "127.0.0.1:0", "--crashloop-cooldown", "600", socket=socket_path,
                   start=False) as d:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))  # the daemon inherits a low soft limit
        try:
            d.start()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        yield d


def open_file_limit(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError("no open-file limit in /proc")


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads /proc/<pid>/limits")
def test_the_daemon_raises_its_soft_open_file_limit(daemon: DaemonProcess) -> None:
    assert daemon.proc is not None
    soft, hard = open_file_limit(daemon.proc.pid)
    assert soft == hard, (soft, hard)  # started with a soft limit of 256


def half_open(path: Path, n: int) -> list[socket.socket]:
    """``n`` connections that send half a request head and then nothing."""
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(path))
        with suppress(OSError):  # a refused one may already be closed
            s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    return socks


def closed_by_server(socks: list[socket.socket]) -> list[bytes]:
    """What the server sent on each before closing it; waits (generously) until it has closed them all."""
    replies = []
    for s in socks:
        s.settimeout(120)
        chunks = []
        with suppress(ConnectionResetError):
            while chunk := s.recv(4096):
                chunks.append(chunk)
        replies.append(b"".join(chunks))
        s.close()
    return replies


def test_idle_connections_are_closed_after_the_header_timeout(daemon: DaemonProcess) -> None:
    socks = half_open(daemon.client.socket_path, 20)
    try:
        assert daemon.status()["dht"]["alive"]  # the owner is answered meanwhile
        replies = closed_by_server(socks)
    finally:
        for s in socks:
            s.close()
    assert all(r.startswith(b"HTTP/1.1 408 ") and b"no complete request within" in r for r in replies), replies[:2]
    assert daemon.status()["dht"]["alive"]


@pytest.mark.skipif(not IS_ROOT, reason="needs root to open connections as another uid")
def test_another_users_flood_neither_starves_the_owner_nor_stays(daemon: DaemonProcess) -> None:
    path = daemon.client.socket_path
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # another user: 100 half-open connections, held until the server ends them
        code = 1
        try:
            os.close(to_child_w)
            os.close(from_child_r)
            os.setgroups([])
            os.setgid(STRANGER)
            os.setuid(STRANGER)
            socks = half_open(path, 100)
            os.write(from_child_w, b"open\n")
            replies = closed_by_server(socks)
            kinds = {"408": sum(r.startswith(b"HTTP/1.1 408 ") for r in replies),
                     "429": sum(r.startswith(b"HTTP/1.1 429 ") for r in replies),
                     "429_text": next((r.decode(errors="replace") for r in replies if b" 429 " in r[:20]), "")}
            os.write(from_child_w, json.dumps(kinds).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(to_child_r)
    os.close(from_child_w)
    try:
        with os.fdopen(from_child_r, "rb") as pipe:
            assert pipe.readline() == b"open\n"
            status = daemon.status()  # while 100 connections of another uid are open
            assert status["dht"]["alive"]
            assert daemon.call("logs")["lines"] is not None  # full control too
            kinds = json.loads(pipe.read())
    finally:
        os.close(to_child_w)
        os.waitpid(pid, 0)
    assert kinds["408"] + kinds["429"] == 100, kinds
    assert kinds["429"] >= 100 - 64 and f"uid {STRANGER}" in kinds["429_text"], kinds
    assert daemon.status()["dht"]["alive"]


# --- the dashboard's session on the loopback listener -----------------------------------------

class Listener:
    def __init__(self, d: DaemonProcess) -> None:
        url = d.status()["http"]["url"]
        self.host, port = url.removeprefix("http://").rsplit(":", 1)
        self.port = int(port)
        self.token_file = d.state_dir / "http.token"

    def token(self) -> str:
        return self.token_file.read_text().strip()

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            reply = conn.getresponse()
            return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
        finally:
            conn.close()

    def login(self) -> tuple[str, str, dict[str, str]]:
        """``GET /?token=``: (session id, control key, the redirect's headers)."""
        status, headers, _ = self.request("GET", f"/?token={self.token()}")
        assert status == 303, headers
        cookie = headers["set-cookie"]
        session_id = cookie.split(";", 1)[0].removeprefix("hivemindd_session=")
        location = headers["location"]
        assert location.startswith("/#")
        return session_id, location[2:], headers


def code_of(reply: tuple[int, dict[str, str], bytes]) -> tuple[int, str]:
    status, _, body = reply
    return status, json.loads(body)["error"]["code"] if status >= 400 else ""


def test_the_dashboard_gets_a_session_never_the_token(daemon: DaemonProcess) -> None:
    site = Listener(daemon)
    token = site.token()
    session_id, key, headers = site.login()
    cookie = headers["set-cookie"]
    assert token not in cookie and token not in headers["location"] and session_id != token
    assert len(session_id) >= 32 and len(key) >= 32 and key != session_id
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Max-Age=" in cookie
    jar = {"Cookie": f"hivemindd_session={session_id}"}

    assert site.request("GET", "/", jar)[0] == 200
    assert site.request("GET", "/v1/status", jar)[0] == 200
    # What another local web server that saw the cookie could do: read, not control.
    for extra in ({}, {"X-Hivemindd-Dashboard": "1"}, {"X-Hivemindd-Dashboard": session_id}):
        assert code_of(site.request("POST", "/v1/pause", {**jar, **extra}, b"{}")) == (403, "forbidden")
        assert code_of(site.request("GET", "/v1/logs", {**jar, **extra})) == (403, "forbidden")
    # The page itself, with the key from the redirect's fragment, controls.
    own = {**jar, "X-Hivemindd-Dashboard": key}
    assert code_of(site.request("POST", "/v1/pause", own, b"{}")) == (409, "conflict")  # authorized; not in a run
    assert site.request("GET", "/v1/logs", own)[0] == 200
    # A session id is no bearer token, and the token is no session.
    assert site.request("GET", "/v1/status", {"Authorization": f"Bearer {session_id}"})[0] == 401
    for name in ("hivemindd_session", "hivemindd_token"):
        assert site.request("GET", "/v1/status", {"Cookie": f"{name}={token}"})[0] == 401
    assert site.request("GET", "/v1/status", {"Authorization": f"Bearer {token}"})[0] == 200
    two, _, _ = site.login()
    assert two != session_id and site.request("GET", "/v1/status", {"Cookie": f"hivemindd_session={two}"})[0] == 200


def test_a_new_token_ends_every_session_and_the_old_token(daemon: DaemonProcess) -> None:
    site = Listener(daemon)
    old = site.token()
    session_id, _, _ = site.login()
    jar = {"Cookie": f"hivemindd_session={session_id}"}
    assert site.request("GET", "/v1/status", jar)[0] == 200
    new = "n" * 43
    tmp = site.token_file.with_name("http.token.new")
    tmp.write_text(new + "\n")
    tmp.chmod(0o600)
    tmp.replace(site.token_file)  # the owner rotates the token
    status, _, body = site.request("GET", "/v1/status", jar)
    assert status == 401 and "/?token=" in json.loads(body)["error"]["message"]
    assert site.request("GET", "/v1/status", {"Authorization": f"Bearer {old}"})[0] == 401
    assert site.request("GET", "/v1/status", {"Authorization": f"Bearer {new}"})[0] == 200
    assert site.login()[0]


def test_sessions_die_with_the_daemon(daemon: DaemonProcess) -> None:
    site = Listener(daemon)
    session_id, key, _ = site.login()
    jar = {"Cookie": f"hivemindd_session={session_id}", "X-Hivemindd-Dashboard": key}
    assert site.request("GET", "/v1/status", jar)[0] == 200
    assert daemon.stop() == 0
    daemon.start()
    site = Listener(daemon)
    status, _, body = site.request("GET", "/v1/status", jar)
    assert status == 401 and "expired or ended" in json.loads(body)["error"]["message"]
    status, headers, _ = site.request("GET", f"/?token={site.token()}", jar)  # the browser still sends the old cookie
    assert status == 303 and session_id not in headers["set-cookie"]  # logging in again works


# --- error lines and read-only users, with a trainer that really fails -------------------------

@pytest.mark.skipif(not IS_ROOT, reason="needs root to ask as another uid")
def test_a_read_only_user_sees_no_error_lines_of_a_failing_trainer(daemon: DaemonProcess, world: Path) -> None:
    spec = spec_toml({"data": {"train": f"{world}/no-data/train-{{00000..00003}}.tar"}})
    daemon.call("join", {"run_id": "broken", "spec_toml": spec, "device": "cpu", "batch_size": 8})
    try:
        lines = wait_until(lambda: daemon.trainer()["error_lines"], 180, "the owner to see the trainer's error lines")
        assert lines

        def stranger_status() -> Any:
            status, body = as_user(STRANGER, lambda: [json.loads(part) if isinstance(part, bytes) else part
                                                      for part in daemon.client.exchange("GET", "/v1/status")])
            assert status == 200
            trainer = body["trainer"]
            return trainer if trainer["state"] in ("backoff", "crashloop") else None

        seen = wait_until(stranger_status, 180, "another user to see the trainer failing")
        assert seen["error_lines"] == [] and seen["error_lines_withheld"] is True, seen
    finally:
        daemon.call("leave")


def test_the_daemon_is_still_fine(daemon: DaemonProcess) -> None:
    assert daemon.status()["dht"]["alive"]
    assert "api.handler_failed" not in (daemon.state_dir / "daemon.log").read_text(errors="replace")

