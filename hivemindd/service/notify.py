"""Tell the service manager how the daemon is doing: systemd's sd_notify protocol, stdlib only.

systemd (``Type=notify``) passes ``NOTIFY_SOCKET``: a unix datagram socket, a
path or an abstract name written with a leading ``@``. Each datagram holds
newline-separated ``KEY=VALUE`` assignments: ``READY=1`` once the control API
and the DHT are up, ``STATUS=`` a one-line summary shown by ``systemctl
status``, ``WATCHDOG=1`` at least every ``WATCHDOG_USEC`` (we send it at half
that), ``STOPPING=1`` when shutdown begins. Without ``NOTIFY_SOCKET``
(foreground use, launchd) every call is a no-op and no task runs.

The watchdog ping comes from a task on the daemon's event loop, not from a
thread: if the loop wedges, the pings stop and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, MutableMapping
from contextlib import suppress

import structlog

from hivemindd.wire.states import TrainerState
from hivemindd.wire.status import HostStatus

log = structlog.get_logger(__name__)

STATUS_EVERY_S = 2.0  # how often the summary is recomputed; a datagram goes out only when it changed
STATUS_MAX_CHARS = 200  # systemctl shows one line; a long crash message is cut


class Notifier:
    """Sends sd_notify datagrams to ``address`` (None: no service manager listening, every call a no-op)."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_s = watchdog_usec / 1e6 if watchdog_usec else None
        self._sock: socket.socket | None = None

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """Read (and remove, as ``sd_notify(unset_environment=1)`` does) the variables systemd sets.

        Removing them keeps the trainer, the DHT's child process and p2pd from
        inheriting a socket that is the daemon's alone to speak on.
        """
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", None) or None
        usec_text = env.pop("WATCHDOG_USEC", None)
        pid_text = env.pop("WATCHDOG_PID", None)
        watchdog_usec = None
        if usec_text:
            try:
                watchdog_usec = int(usec_text)
            except ValueError:
                log.warning("notify.bad_watchdog_usec", value=usec_text)
            # WATCHDOG_PID names the process the watchdog is meant for; a stale value inherited from a parent is not us.
            if pid_text and pid_text != str(os.getpid()):
                watchdog_usec = None
        if address is not None and not (address.startswith(("/", "@"))):
            log.warning("notify.unsupported_socket", address=address)  # vsock:… and the like: not ours to speak
            address = None
        return cls(address, watchdog_usec if watchdog_usec and watchdog_usec > 0 else None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str) -> bool:
        """Send one datagram (``send(READY="1", STATUS="…")``); False when there is no one to tell or it failed."""
        if self.address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        # An abstract socket ('@name') is a name starting with a NUL byte, not a file.
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never block the event loop: a datagram queue the manager does not drain (net.unix.max_dgram_qlen
                # is small) would otherwise freeze the daemon mid-stop. A dropped STATUS goes out again.
                self._sock.setblocking(False)
            self._sock.sendto(message, target)
        except BlockingIOError:
            log.debug("notify.dropped", fields=list(fields))
            return False
        except OSError as exc:
            # A failed notification must never take the daemon down; systemd notices missing pings itself.
            log.warning("notify.send_failed", address=self.address, error=str(exc))
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY="1", STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG="1")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send(STOPPING="1", STATUS=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class ServiceHeartbeat:
    """Owns the task that keeps systemd informed: STATUS when the summary changes, WATCHDOG at half the timeout.

    ``start`` sends READY=1; ``stopping`` sends STOPPING=1 while the task keeps
    pinging through a long stop (a trainer checkpointing for minutes is not a
    hang); ``close`` cancels and awaits the task.
    """

    def __init__(self, notifier: Notifier, summary: Callable[[], str], clock: Callable[[], float] = time.monotonic) -> None:
        self.notifier = notifier
        self.summary = summary
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._last_status: str | None = None
        self._stopping = False

    def start(self) -> None:
        if not self.notifier.enabled:
            return  # foreground use: nothing to tell, no task to wake up
        self._last_status = self._safe_summary()
        self.notifier.ready(self._last_status)
        log.info("notify.ready", watchdog_s=self.notifier.watchdog_s)
        self._task = asyncio.create_task(self._beat(), name="service-heartbeat")

    def stopping(self) -> None:
        self._stopping = True
        training = (self._last_status or "").startswith("training")
        self._last_status = "stopping: the trainer checkpoints first" if training else "stopping"
        self.notifier.stopping(self._last_status)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.notifier.close()

    async def _beat(self) -> None:
        watchdog_every = self.notifier.watchdog_s / 2 if self.notifier.watchdog_s else None
        tick = min(STATUS_EVERY_S, watchdog_every) if watchdog_every else STATUS_EVERY_S
        next_ping = self._clock()
        while True:
            now = self._clock()
            if watchdog_every is not None and now >= next_ping:
                self.notifier.watchdog()
                next_ping = now + watchdog_every
            if not self._stopping:
                line = self._safe_summary()
                if line != self._last_status and self.notifier.status(line):
                    self._last_status = line  # only once delivered: a dropped one goes out again next tick
            await asyncio.sleep(tick)

    def _safe_summary(self) -> str:
        try:
            return self.summary()[:STATUS_MAX_CHARS]
        except Exception as exc:  # a summary bug must not stop the watchdog pings
            log.warning("notify.summary_failed", error=repr(exc))
            return "running"


def status_line(status: HostStatus) -> str:
    """One line for ``systemctl status`` from the control API's status answer.

    Only values a person cares about at a glance, and nothing that changes every
    second (a retry countdown), so STATUS= goes out when something happened.
    """
    run_id, peers, trainer = status.run_id, status.peers, status.trainer
    state = trainer.state
    notes = []
    if not status.dht.alive:
        notes.append("DHT down")
    if status.discovery.state == "degraded":
        notes.append("discovery degraded")
    suffix = f" ({', '.join(notes)})" if notes else ""
    if run_id is None:
        return f"idle, not joined{suffix}"
    if status.paused or state == TrainerState.PAUSED:
        until = (status.pause or {}).get("until")
        return f"paused{' until ' + str(until) if until else ''}, run {run_id}{suffix}"
    if state == TrainerState.CRASHLOOP:
        error = str(trainer.last_error or "trainer keeps failing").strip().splitlines()
        return f"crashloop: {error[0] if error else 'trainer keeps failing'}"
    if state == TrainerState.BACKOFF:
        return f"restarting {run_id} after a failure (restarts: {trainer.restarts}){suffix}"
    if state == TrainerState.RUNNING:
        where = f", global step {trainer.epoch}" if trainer.epoch is not None else ""
        return f"training {run_id}{where}, {peers} peer{'s' if peers != 1 else ''}{suffix}"
    return f"{state or 'starting'} {run_id}, {peers} peer{'s' if peers != 1 else ''}{suffix}"
