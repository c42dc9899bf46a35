"""hmctl's side of the control API: find the daemon's socket, send one request, exit with a reason.

Stdlib HTTP/1.0 over the unix socket (no http.client, no aiohttp): every call costs
milliseconds. Failures end the command with a message that says what to do and a named
exit code (wire/protocol.py).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from hivemindd.hmctl.render import printable
from hivemindd.wire.protocol import EX_FAILURE, EX_NOPERM, EX_UNAVAILABLE, ROUTES

SYSTEM_SOCKET = Path("/run/hivemindd/hivemindd.sock")  # the system unit's (systemd/hivemindd.service)


SOCKET_NAME = "hivemindd.sock"  # the daemon's socket in its state dir (config.py's default)
# sun_path holds 108 bytes on Linux and 104 on macOS and the BSDs, the terminating NUL included.
SOCKET_PATH_LIMIT = 107 if sys.platform.startswith("linux") else 103


def default_socket() -> Path:
    """$HIVEMINDD_STATE_DIR's socket; else this user's daemon's; else the system service's if it exists."""
    state_dir = os.environ.get("HIVEMINDD_STATE_DIR")
    if state_dir:
        return Path(state_dir).expanduser() / SOCKET_NAME
    xdg = os.environ.get("XDG_STATE_HOME")
    own = (Path(xdg) if xdg else Path.home() / ".local" / "state") / "hivemindd" / SOCKET_NAME
    return SYSTEM_SOCKET if not own.exists() and SYSTEM_SOCKET.exists() else own


class ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        super().__init__(error.get("message") or f"HTTP {status}")
        self.status = status
        self.body = body


class Client:
    """One daemon, addressed by its socket path; raises ApiError for 4xx/5xx answers."""

    def __init__(self, socket_path: Path, json_output: bool = False, timeout: float = 120.0) -> None:
        self.socket_path = socket_path
        self.json_output = json_output
        self.timeout = timeout

    def check_path(self) -> None:
        """Exit with a message that says what to do when the socket path cannot be a unix socket's address."""
        size = len(os.fsencode(self.socket_path))
        if size > SOCKET_PATH_LIMIT:
            fail(f"socket path {self.socket_path} is {size} bytes, longer than a unix socket address may be "
                 f"({SOCKET_PATH_LIMIT} bytes on this system): start hivemindd with a shorter --state-dir or "
                 "--socket, or make a symbolic link to the socket in a short folder and pass that as --socket.",
                 EX_UNAVAILABLE)

    def reachable(self) -> bool:
        """Whether something accepts connections on the socket (without asking it anything)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket_path))
                return True
            except OSError:
                return False

    def exchange(self, method: str, path: str, payload: bytes | None = None) -> tuple[int, bytes]:
        """One HTTP/1.0 request over the socket: (status, body). The server closes after replying,
        so no keep-alive, chunking or header parsing is needed (and http.client's import cost is saved)."""
        head = [f"{method} {path} HTTP/1.0", "Host: localhost", "Accept: application/json"]
        if payload is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
        request = ("\r\n".join(head) + "\r\n\r\n").encode() + (payload or b"")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(str(self.socket_path))
            sock.sendall(request)
            chunks = []
            while chunk := sock.recv(1 << 16):
                chunks.append(chunk)
        header, _, body = b"".join(chunks).partition(b"\r\n\r\n")
        status_line = header.split(b"\r\n", 1)[0].split()
        if len(status_line) < 2 or not status_line[1].isdigit():
            raise ValueError(f"not an HTTP reply: {header[:80]!r}")
        return int(status_line[1]), body

    def call(self, name: str, body: dict[str, Any] | None = None, query: str = "") -> Any:
        route = ROUTES[name]
        payload = json.dumps(body).encode() if body is not None else None
        self.check_path()
        try:
            status, raw = self.exchange(route.method, route.path + (f"?{query}" if query else ""), payload)
        except (FileNotFoundError, ConnectionRefusedError):
            fail(f"hivemindd is not running (nothing listens on {self.socket_path}). Start it with `hivemindd`, "
                 "or check `systemctl status hivemindd`; pass --state-dir or --socket if it uses another path.",
                 EX_UNAVAILABLE)
        except PermissionError:
            fail(f"permission denied on {self.socket_path}: run as the daemon's user or a member of its group.",
                 EX_NOPERM)
        except TimeoutError:
            fail(f"hivemindd did not answer within {self.timeout:.0f} s on {self.socket_path}.", EX_UNAVAILABLE)
        except (OSError, ValueError) as exc:
            fail(f"cannot talk to hivemindd on {self.socket_path}: {exc}", EX_UNAVAILABLE)
        try:
            decoded = json.loads(raw) if raw else None
        except ValueError:
            fail(f"hivemindd sent a reply that is not JSON (HTTP {status})", EX_UNAVAILABLE)
        if status >= 400:
            raise ApiError(status, decoded if isinstance(decoded, dict) else {})
        return decoded

    def act(self, name: str, body: dict[str, Any] | None = None) -> Any:
        """Call and turn an API error into a one-line message and exit 1 (77 when not allowed)."""
        try:
            return self.call(name, body)
        except ApiError as exc:
            fail(str(exc), EX_NOPERM if exc.status in (401, 403) else EX_FAILURE)

    def show(self, value: Any, human: str) -> None:
        click.echo(json.dumps(value, indent=2) if self.json_output else human)


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"hmctl: {printable(message)}", err=True)
    sys.exit(code)
