"""Trainer processes: start one as a fresh interpreter in its own process group, read
its output and events, signal it, reap the whole group, and end a stale one left by
a daemon that died (the pid file)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any, Protocol

import psutil
import structlog

from hivemindd.host.statedir import write_atomic
from hivemindd.wire.launch import TrainerLaunch

log = structlog.get_logger(__name__)

EventHandler = Callable[[dict[str, Any]], None]
LineHandler = Callable[[str], None]
_MAX_EVENT_BYTES = 64 * 1024
_OUTPUT_LIMIT = 64 * 1024  # asyncio's default line limit for the trainer's output


class TrainerHandle(Protocol):
    pid: int

    async def wait(self) -> int:
        """The exit code (negative: killed by that signal), once output and events are drained."""

    def terminate(self) -> None:
        """Ask the trainer to checkpoint and exit (SIGTERM to its main process)."""

    def kill(self) -> None:
        """SIGKILL the trainer's whole process group (its DHT and p2pd too)."""


class Spawner(Protocol):
    async def spawn(self, launch: TrainerLaunch, on_event: EventHandler, on_line: LineHandler) -> TrainerHandle:
        """Start a trainer; raises OSError when it cannot even be started."""


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class PidFile:
    """Records the running trainer (pid, process group, start time) so a new daemon can end it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, pid: int) -> None:
        created = psutil.Process(pid).create_time()
        body = json.dumps({"pid": pid, "pgid": pid, "create_time": created}).encode()
        write_atomic(self.path, body, mode=0o600)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def end_stale(self, timeout_s: float = 10.0) -> int | None:
        """End a trainer recorded by an earlier daemon (SIGTERM, then SIGKILL); returns its pid."""
        try:
            raw = json.loads(self.path.read_bytes())
            pid, pgid, created = int(raw["pid"]), int(raw["pgid"]), float(raw["create_time"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("trainer.bad_pid_file", path=str(self.path))
            self.remove()
            return None
        members = [
            p for p in psutil.process_iter(["create_time"])
            if _pgid(p.pid) == pgid and p.info["create_time"] is not None and p.info["create_time"] >= created - 1
        ]
        # A recycled pid has a later start time than the one we recorded: leave it alone.
        leader_alive = any(p.pid == pid and abs(p.info["create_time"] - created) < 1 for p in members)
        if leader_alive:
            log.warning("trainer.ending_stale", pid=pid)
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            with suppress(psutil.NoSuchProcess):
                psutil.Process(pid).wait(timeout_s)
        if members:
            kill_group(pgid)
            psutil.wait_procs(members, timeout=5)
        self.remove()
        return pid if members else None


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


class _ExitProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Also resolves ``exited`` the moment the trainer's main process ends.

    ``Process.wait()`` (Python 3.11) returns only once every pipe is closed, and the
    trainer's DHT process, p2pd and loader workers hold its stdout: after a SIGKILL of
    the main process alone (the OOM killer's way) they would keep ``wait()`` hanging.
    """

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self.exited: asyncio.Future[None] = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


class _ProcessHandle:
    def __init__(self, proc: asyncio.subprocess.Process, exited: asyncio.Future[None],
                 readers: list[asyncio.Task[None]], pid_file: PidFile) -> None:
        self._proc = proc
        self._exited = exited
        self._readers = readers
        self._pid_file = pid_file
        self.pid = proc.pid

    async def wait(self) -> int:
        await asyncio.shield(self._exited)
        code = self._proc.returncode
        assert code is not None
        # The trainer's DHT process, p2pd and loader workers share its group; none may outlive it.
        kill_group(self.pid)
        _, pending = await asyncio.wait(self._readers, timeout=5)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        self._pid_file.remove()
        return code

    def terminate(self) -> None:
        with suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        kill_group(self.pid)


class ProcessSpawner:
    """Starts ``python -m hivemindd.trainer`` with its launch file, a log pipe and an event pipe."""

    def __init__(self, pid_file: PidFile, env: dict[str, str] | None = None) -> None:
        self.pid_file = pid_file
        self.env = env

    async def spawn(self, launch: TrainerLaunch, on_event: EventHandler, on_line: LineHandler) -> TrainerHandle:
        work_dir = Path(launch.work_dir)
        launch_file = work_dir / "launch.json"
        write_atomic(launch_file, launch.to_json().encode(), mode=0o600)
        read_fd, write_fd = os.pipe()
        env = dict(self.env if self.env is not None else os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.subprocess_exec(
                lambda: _ExitProtocol(limit=_OUTPUT_LIMIT, loop=loop),
                sys.executable, "-m", "hivemindd.trainer", "--launch", str(launch_file), "--events-fd", str(write_fd),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                pass_fds=(write_fd,),
                start_new_session=True,
                cwd=work_dir,
                env=env,
            )
            proc = asyncio.subprocess.Process(transport, protocol, loop)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.pid_file.write(proc.pid)
        assert proc.stdout is not None
        readers = [
            asyncio.create_task(_read_lines(proc.stdout, on_line), name="trainer-output"),
            asyncio.create_task(_read_events(read_fd, on_event), name="trainer-events"),
        ]
        return _ProcessHandle(proc, protocol.exited, readers, self.pid_file)


async def _read_lines(stream: asyncio.StreamReader, on_line: LineHandler) -> None:
    while True:
        try:
            line = await stream.readline()
        except ValueError:  # a line over the stream limit: keep what fits
            line = await stream.read(64 * 1024)
        if not line:
            return
        on_line(line.decode(errors="replace").rstrip("\n"))


async def _read_events(fd: int, on_event: EventHandler) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_MAX_EVENT_BYTES)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb"))
    try:
        while True:
            try:
                line = await reader.readline()
            except ValueError:
                log.warning("trainer.event_too_long")
                continue
            if not line:
                return
            try:
                event = json.loads(line)
            except ValueError:
                log.warning("trainer.bad_event", line=line[:200])
                continue
            if isinstance(event, dict) and isinstance(event.get("type"), str):
                event.setdefault("time", time.time())
                on_event(event)
    finally:
        transport.close()
