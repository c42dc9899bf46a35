"""A real daemon refuses what it can know is wrong before acting on it, and says only what is true."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemons import DaemonProcess, assert_no_process_left, daemon_at
from tests.support.repo import REPO
from tests.support.specs import spec_toml


def _cuda_visible() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[DaemonProcess]:
    with daemon_at(short_tmp / "d") as d:
        yield d


@pytest.mark.skipif(_cuda_visible(), reason="this machine has a CUDA GPU: --device cuda is fine here")
def test_join_with_a_device_this_host_lacks_is_refused_at_once(daemon: DaemonProcess, short_tmp: Path) -> None:
    """Issue 10: `hmctl join --device cuda` on a CPU host said "joined" and exited 0; the error came later."""
    spec = short_tmp / "run.toml"
    spec.write_text(spec_toml())
    done = daemon.hmctl("join", "--run-id", "mine", "--spec", str(spec), "--device", "cuda")
    assert done.returncode == 1, done
    assert done.stderr.strip() == ("hmctl: host.device: 'cuda' was asked for but torch sees no CUDA GPU "
                                   "(use 'auto' or 'cpu')")  # the trainer's own words
    assert "joined" not in done.stdout
    status = daemon.status()
    assert status["run_id"] is None and status["trainer"]["state"] == "stopped"
    assert not (short_tmp / "discovery" / "runs" / "mine").exists()  # a refused join creates no run either
    err = daemon.api_error("join", {"run_id": "mine", "spec_toml": spec_toml(), "device": "mps"})
    assert err.status == 409 and err.body["error"]["field"] == "device" and "Apple GPU" in str(err)


def _refused_start(state_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hivemindd.daemon", "--state-dir", str(state_dir), "--heartbeat", "1", *extra],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def test_a_daemon_that_cannot_start_says_why_and_never_stopping(short_tmp: Path) -> None:
    """Issue 10: a daemon refused to start and logged daemon.stopping / daemon.stopped first."""
    state = short_tmp / "s"
    state.mkdir()
    # Another daemon holds the state dir: refused before anything starts.
    fd = os.open(state / "hivemindd.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, b"4242\n", 0)
        done = _refused_start(state)
    finally:
        os.close(fd)
    assert done.returncode == 78, done
    assert "another hivemindd (pid 4242)" in done.stderr
    assert "daemon.stopping" not in done.stderr and "daemon.stopped" not in done.stderr
    # Something else holds the socket: refused once the DHT is already up, which must still go away.
    sock_path = short_tmp / "busy.sock"
    with socket.socket(socket.AF_UNIX) as busy:
        busy.bind(str(sock_path))
        busy.listen()
        done = _refused_start(state, "--socket", str(sock_path))
    assert done.returncode == 78, done
    assert "is in use by another process" in done.stderr
    assert "daemon.stopping" not in done.stderr and "daemon.stopped" not in done.stderr
    assert_no_process_left(short_tmp)
