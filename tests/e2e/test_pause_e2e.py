"""Pause semantics with a real daemon and trainer: after a checkpoint, timed, across a daemon restart.

One daemon, one run, tests in file order (each trainer start costs ~30 s on two
cores, so the journey starts the trainer twice in all).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hivemindd.state import parse_utc_iso
from tests.e2e.conftest import TEST_SPEC, DaemonProcess, check_schema, wait_until

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    root = Path(tempfile.mkdtemp(prefix="hmp", dir="/tmp"))
    (root / "discovery").mkdir()
    (root / "spec.toml").write_text(TEST_SPEC)
    d = DaemonProcess(root / "a", root / "discovery")
    try:
        d.start()
        joined = d.hmctl("join", "--run-id", "pz", "--spec", str(root / "spec.toml"), "--batch-size", "16",
                         "--device", "cpu")
        assert joined.returncode == 0, joined.stderr
        yield d
    finally:
        d.reap()
        shutil.rmtree(root, ignore_errors=True)


def trainer_log(d: DaemonProcess) -> list[str]:
    return (d.state_dir / "logs" / "trainer.log").read_text(errors="replace").splitlines()


def test_a_bad_duration_is_refused_naming_the_flag_and_changes_nothing(daemon: DaemonProcess) -> None:
    result = daemon.hmctl("pause", "--for", "10 minutes")
    assert result.returncode == 2 and "'--for'" in result.stderr and "like 90s, 30m, 2h or 1h30m" in result.stderr
    err = daemon.api_error("pause", {"for": "-1h"})
    assert err.status == 400 and err.body["error"]["field"] == "for"
    check_schema(err.body, "Error")
    err = daemon.api_error("pause", {"for": "1h", "after_checkpoint": "soon"})
    assert err.status == 400 and err.body["error"]["field"] == "after_checkpoint"
    assert daemon.status()["paused"] is False
    assert json.loads((daemon.state_dir / "state.json").read_text())["paused"] is False


def test_after_checkpoint_pause_stops_the_trainer_right_after_its_next_checkpoint(daemon: DaemonProcess) -> None:
    wait_until(lambda: (t := daemon.trainer())["state"] == "running" and (t["step"] or 0) >= 1, 300,
               "the trainer to take steps")
    result = daemon.hmctl("pause", "--after-checkpoint", "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    check_schema(answer, "PauseResult")
    assert answer["pause"] == {"until": None, "remaining_s": None, "after_checkpoint": True}
    paused = wait_until(lambda: (t := daemon.trainer())["state"] == "paused" and t, 120, "the trainer to pause")
    lines = trainer_log(daemon)
    asked = next(i for i, line in enumerate(lines) if "pausing as asked" in line)
    checkpoint_step = int(lines[asked].split("checkpoint at step ")[1].split(":")[0])
    stopping = next(i for i, line in enumerate(lines) if "running -> stopping: paused" in line)
    assert stopping > asked  # it trained on until the checkpoint, then stopped
    every_steps = 5  # TEST_SPEC's checkpoint cadence: it did not run on to the next one
    assert checkpoint_step <= paused["checkpoint_step"] < checkpoint_step + every_steps
    status = daemon.status()
    check_schema(status, "Status")
    assert status["paused"] is True and status["pause"]["after_checkpoint"] is False
    assert "paused indefinitely" in daemon.hmctl("status").stdout


def test_timed_pause_survives_a_daemon_restart_and_ends_by_itself(daemon: DaemonProcess) -> None:
    result = daemon.hmctl("pause", "--for", "20s")
    assert result.returncode == 0 and "paused until" in result.stdout and "(in 20s)" in result.stdout
    until = daemon.status()["pause"]["until"]
    assert abs(parse_utc_iso(until) - (time.time() + 20)) < 5
    assert daemon.stop() == 0
    assert json.loads((daemon.state_dir / "state.json").read_text())["pause_until"] == until
    daemon.start()
    status = daemon.status()
    assert status["paused"] is True and status["pause"]["until"] == until, status
    assert status["trainer"]["state"] == "paused"
    shown = daemon.hmctl("status").stdout
    assert "paused until" in shown and "(in " in shown
    resumed = wait_until(lambda: (t := daemon.trainer())["state"] in ("starting", "running") and t, 60,
                         "the timed pause to end by itself")
    assert time.time() >= parse_utc_iso(until) - 1
    assert daemon.status()["paused"] is False and daemon.status()["pause"] is None
    assert json.loads((daemon.state_dir / "state.json").read_text())["paused"] is False  # persisted too
    assert "pause over: resuming training" in "\n".join(trainer_log(daemon))
    assert resumed["pid"] is not None


def test_resume_cancels_a_timed_pause(daemon: DaemonProcess) -> None:
    assert daemon.hmctl("pause", "--for", "1h").returncode == 0
    assert 3590 < daemon.status()["pause"]["remaining_s"] <= 3600
    result = daemon.hmctl("resume")
    assert result.returncode == 0 and "resumed run pz" in result.stdout
    assert daemon.status()["paused"] is False and daemon.status()["pause"] is None
    assert json.loads((daemon.state_dir / "state.json").read_text())["pause_until"] is None
