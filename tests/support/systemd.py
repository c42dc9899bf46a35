"""A stand-in for systemd's notify socket: what a daemon under Type=notify tells systemd, and from which pid."""

from __future__ import annotations

import array
import socket
import struct
import threading

from tests.support.waiting import wait_until


class FakeSystemd:
    """A bound AF_UNIX datagram socket, read by a thread as systemd would, recording (sender pid, fields)."""

    def __init__(self, address: str) -> None:
        self.address = address  # what NOTIFY_SOCKET says: a path, or '@name' for the abstract namespace
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # systemd checks the sender's pid too
        self.sock.settimeout(0.1)
        self.seen: list[tuple[int, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
            except (TimeoutError, OSError):
                continue
            pid = -1
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = array.array("i", payload[: struct.calcsize("3i")])[0]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            with self._lock:
                self.seen.append((pid, fields))

    def snapshot(self) -> list[tuple[int, dict[str, str]]]:
        with self._lock:
            return list(self.seen)

    def values(self, key: str) -> list[str]:
        return [fields[key] for _, fields in self.snapshot() if key in fields]

    def wait_for(self, key: str, value: str, timeout: float = 90, prefix: bool = False) -> dict[str, str]:
        """The first notification whose ``key`` equals ``value`` (or starts with it, with ``prefix``)."""
        def probe() -> dict[str, str] | None:
            for _, fields in self.snapshot():
                got = fields.get(key)
                if got is not None and (got.startswith(value) if prefix else got == value):
                    return fields
            return None

        return wait_until(probe, timeout, f"{key}={value} from the daemon", interval=0.05)

    def close(self) -> None:
        self._closed.set()
        self._reader.join(timeout=5)
        self.sock.close()
