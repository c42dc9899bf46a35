"""Real daemons (and their trainers) in subprocesses on loopback, reaped whatever happens.

``daemon_at`` is the factory tests use; ``seed_paused_run`` leaves a state dir as a reboot would
(joined, paused for an hour), so a daemon has a run to answer about but no trainer takes the cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psutil
import pytest

from hivemindd.hmctl.client import ApiError, Client
from hivemindd.host.state import DesiredState, save_state
from hivemindd.host.statedir import StatePaths, write_atomic
from hivemindd.wire.launch import HostSettings
from hivemindd.wire.spec import parse_toml
from tests.support.repo import REPO
from tests.support.specs import spec_toml
from tests.support.waiting import wait_until


class DaemonProcess:
    """One hivemindd with its own state dir and socket; logs to <state>/daemon.log.

    Heartbeats every second and a 5 s TTL, so discovery moves at test speed.
    ``socket``: serve the control API there instead of <state>/hivemindd.sock.
    """

    def __init__(self, state_dir: Path, discovery: Path | str, *extra: str, socket: Path | None = None) -> None:
        self.state_dir = state_dir
        self.discovery = discovery if isinstance(discovery, str) else discovery.as_uri()
        self.extra = extra if socket is None else ("--socket", str(socket), *extra)
        self.client = Client(socket or state_dir / "hivemindd.sock", timeout=60)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with open(self.state_dir / "daemon.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hivemindd.daemon", "--state-dir", str(self.state_dir),
                 "--discovery", self.discovery, "--heartbeat", "1", "--ttl", "5",
                 "--stop-timeout", "30", *self.extra],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, start_new_session=True, cwd=REPO,
            )
        wait_until(self._answers, 90, f"daemon in {self.state_dir} to answer")
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log_tail()}")
        return self.client.reachable()

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.client.call("status")
        return result

    def trainer(self) -> dict[str, Any]:
        trainer: dict[str, Any] = self.status()["trainer"]
        return trainer

    def call(self, name: str, body: dict[str, Any] | None = None) -> Any:
        return self.client.call(name, body)

    def api_error(self, name: str, body: dict[str, Any] | None = None) -> ApiError:
        with pytest.raises(ApiError) as err:
            self.client.call(name, body)
        return err.value

    def hmctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hivemindd.cli", "--socket", str(self.client.socket_path), *args],
                              capture_output=True, text=True, timeout=60)

    def stop(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def log_tail(self, n: int = 40) -> str:
        path = self.state_dir / "daemon.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""

    def reap(self) -> None:
        """Kill this daemon's process group and any trainer group it recorded."""
        if self.proc is not None and self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        pid_file = self.state_dir / "trainer.pid"
        if pid_file.exists():
            with suppress(ValueError, KeyError, ProcessLookupError, PermissionError):
                os.killpg(int(json.loads(pid_file.read_text())["pgid"]), signal.SIGKILL)


@contextmanager
def daemon_at(state_dir: Path, *flags: str, discovery: Path | str | None = None, socket: Path | None = None,
              start: bool = True) -> Iterator[DaemonProcess]:
    """A daemon in ``state_dir``, started unless ``start`` is False, reaped on the way out whatever happened.

    ``discovery``: a folder or URL, used as given; by default ``discovery/`` beside the state
    dir, made here, so the daemons of one test root find each other.
    """
    if discovery is None:
        discovery = state_dir.parent / "discovery"
        discovery.mkdir(exist_ok=True)
    daemon = DaemonProcess(state_dir, discovery, *flags, socket=socket)
    try:
        if start:
            daemon.start()
        yield daemon
    finally:
        daemon.reap()


def seed_paused_run(state_dir: Path, spec: str | None = None, run_id: str = "pz") -> StatePaths:
    """Make ``state_dir`` joined to ``run_id`` (``spec``: TOML, the test run by default) and paused for an hour."""
    paths = StatePaths(state_dir)
    paths.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(paths.run_spec(run_id), parse_toml(spec or spec_toml()).to_json().encode())
    save_state(paths.state_file, DesiredState().joined(run_id, HostSettings(device="cpu", batch_size=16))
               .with_paused(True, time.time() + 3600))
    return paths


def processes_left(root: Path) -> list[str]:
    """Processes still alive whose command line mentions ``root`` (daemons, trainers), as 'pid: command'."""
    left = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        with suppress(psutil.Error):
            if proc.info["status"] != psutil.STATUS_ZOMBIE and str(root) in " ".join(proc.info["cmdline"] or []):
                left.append(f"{proc.pid}: {' '.join(proc.info['cmdline'])[:120]}")
    return left


def assert_no_process_left(root: Path, timeout: float = 15.0) -> None:
    """Wait for every process of ``root`` to be gone; kill what outlives ``timeout`` and fail naming it.

    SIGKILLed groups take a moment to leave the process table, hence the wait.
    """
    try:
        wait_until(lambda: not processes_left(root), timeout, f"every process under {root} to end",
                   describe=lambda: processes_left(root))
    except AssertionError:
        for line in processes_left(root):
            with suppress(ProcessLookupError, ValueError):
                os.kill(int(line.split(":")[0]), signal.SIGKILL)
        raise
