"""Where the daemon is reached and what it holds exclusively: the state-dir lock, the unix socket, the loopback TCP port."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

import structlog
from aiohttp import web

from hivemindd.api.auth import Authorizer, LoopbackSecrets, identity_check_available
from hivemindd.api.connections import (
    IDLE_TIMEOUT_S,
    MAX_CONNECTIONS_PER_UID,
    MAX_TCP_CONNECTIONS,
    ConnectionGate,
    no_caller,
    unix_caller,
)
from hivemindd.api.routes import Controller, build_app, peer_guard, token_guard
from hivemindd.host.statedir import StatePaths, load_or_create_token

log = structlog.get_logger(__name__)


class StartupError(RuntimeError):
    """The daemon cannot start; the message says what to do."""


class StateDirLock:
    """One daemon per state dir: an exclusive flock on ``<state>/lock`` holding the owner's pid."""

    def __init__(self, path: Path, root: Path) -> None:
        self.path = path
        self.root = root
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise StartupError(
                f"another hivemindd (pid {holder or '?'}) is using {self.root}; stop it or pass another --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        # Forked children (hivemind's DHT process) must not hold the lock: one orphaned by a
        # SIGKILLed daemon would lock the next daemon out of the state dir it has to clean up.
        os.register_at_fork(after_in_child=self._drop_in_child)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _drop_in_child(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


async def serve_unix(path: Path, controller: Controller, operator_group: str) -> web.AppRunner:
    """The control API on its unix socket; a stale socket file is replaced, a live one refused."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(path))
            raise StartupError(f"{path} is in use by another process; pass another --socket")
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # left by a daemon that died
        finally:
            probe.close()
    gate = ConnectionGate(unix_caller, MAX_CONNECTIONS_PER_UID)  # idle or surplus connections cannot starve others
    runner = web.AppRunner(build_app(controller, peer_guard(Authorizer(operator_group)), gate=gate),
                           access_log=None, keepalive_timeout=IDLE_TIMEOUT_S)
    await runner.setup()
    gate.install(runner)
    # With the caller's identity checked per request, anyone may connect (and read status);
    # without it, file permissions are the only guard. Born with its mode: no window either way.
    old_umask = os.umask(0o111 if identity_check_available() else 0o117)
    try:
        await web.UnixSite(runner, str(path)).start()
    except BaseException:
        await runner.cleanup()
        raise
    finally:
        os.umask(old_umask)
    return runner


async def serve_http(host: str, port: int, controller: Controller, paths: StatePaths) -> tuple[web.AppRunner, str]:
    """The optional TCP listener (dashboard, metrics): same API, bearer token from the state dir. (runner, url)."""
    loopback = LoopbackSecrets(paths.http_token, load_or_create_token(paths.http_token))
    gate = ConnectionGate(no_caller, MAX_TCP_CONNECTIONS)
    runner = web.AppRunner(build_app(controller, token_guard(loopback), loopback, gate), access_log=None,
                           keepalive_timeout=IDLE_TIMEOUT_S)
    await runner.setup()
    gate.install(runner)
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"--http {host}:{port}: cannot listen: {exc.strerror or exc}") from None
    bound_port = runner.addresses[0][1]  # the real one when asked for port 0
    url = f"http://{'[' + host + ']' if ':' in host else host}:{bound_port}"
    log.info("api.http_listening", url=url, token_file=str(paths.http_token))
    return runner, url
