"""Real daemons (and their trainers) in subprocesses on loopback, reaped whatever happens."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from hivemindd.hmctl.client import ApiError, Client

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]

# A run small enough for two trainers on two cores: 32×32 demo shapes, frequent checkpoints.
TEST_SPEC = """
[model]
arch = "resnet18"
num_classes = 10
[data]
train = "demo://shapes/train"
val = "demo://shapes/val"
train_samples = 2000
image_size = 32
[optimizer]
lr = 0.05
target_batch_size = 64
milestones = [30]
[averaging]
matchmaking_time = 1.0
averaging_timeout = 10.0
[checkpoint]
every_steps = 5
[validation]
every_steps = 1000
batches = 2
"""


def wait_until(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2,
               describe: Callable[[], Any] | None = None) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` on timeout.

    ``describe``: what to show of the world when it times out, where the probe's own last
    answer (None, False) says nothing.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    seen = f"; {describe()!r}" if describe is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r}{seen})")


class DaemonProcess:
    """One hivemindd with its own state dir and socket; logs to <state>/daemon.log."""

    def __init__(self, state_dir: Path, discovery: Path | str, *extra: str) -> None:
        self.state_dir = state_dir
        self.discovery = discovery if isinstance(discovery, str) else discovery.as_uri()
        self.extra = extra
        self.client = Client(state_dir / "hivemindd.sock", timeout=60)
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
        return self.status()["trainer"]  # type: ignore[no-any-return]

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


def no_process_left(root: Path) -> list[str]:
    """Processes whose command line mentions ``root`` (daemons, trainers) that are still alive."""
    left = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        with suppress(psutil.Error):
            if proc.info["status"] != psutil.STATUS_ZOMBIE and str(root) in " ".join(proc.info["cmdline"] or []):
                left.append(f"{proc.pid}: {' '.join(proc.info['cmdline'])[:120]}")
    return left


def api_schema(name: str) -> dict[str, Any]:
    """A component schema of hivemindd/wire/openapi.yaml, resolvable by jsonschema."""
    import yaml

    doc = yaml.safe_load((REPO / "hivemindd" / "wire" / "openapi.yaml").read_text())
    return {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}


def check_schema(value: Any, name: str) -> None:
    import jsonschema

    jsonschema.validate(value, api_schema(name))
