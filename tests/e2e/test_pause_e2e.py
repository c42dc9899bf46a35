"""Pause semantics with a real daemon and trainer: timed, across daemon restarts, after a checkpoint.

One daemon, one run, tests in file order. The state dir starts as a reboot
would leave it: joined and paused for an hour, so the restart checks need no
trainer; the trainer starts once (~30 s on two cores) when that pause runs out.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from hivemindd.host.state import parse_utc_iso, utc_iso
from tests.support.daemons import DaemonProcess, daemon_at, seed_paused_run
from tests.support.dirs import short_dir
from tests.support.repo import check_schema
from tests.support.specs import TEST_RUN
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with short_dir("hmp") as root, daemon_at(seed_paused_run(root / "a").root) as d:
        yield d


def trainer_log(d: DaemonProcess) -> list[str]:
    return (d.state_dir / "logs" / "trainer.log").read_text(errors="replace").splitlines()


def state_file(d: DaemonProcess) -> dict:  # type: ignore[type-arg]
    return json.loads((d.state_dir / "state.json").read_text())  # type: ignore[no-any-return]


def test_a_bad_duration_is_refused_naming_the_flag_and_changes_nothing(daemon: DaemonProcess) -> None:
    before = daemon.status()["pause"]
    result = daemon.hmctl("pause", "--for", "10 minutes")
    assert result.returncode == 2 and "'--for'" in result.stderr and "like 90s, 30m, 2h or 1h30m" in result.stderr
    err = daemon.api_error("pause", {"for": "-1h"})
    assert err.status == 400 and err.body["error"]["field"] == "for"
    check_schema(err.body, "Error")
    err = daemon.api_error("pause", {"for": "1h", "after_checkpoint": "soon"})
    assert err.status == 400 and err.body["error"]["field"] == "after_checkpoint"
    assert daemon.status()["pause"]["until"] == before["until"]
    assert state_file(daemon)["pause_until"] == before["until"]


def test_timed_pause_survives_a_daemon_restart(daemon: DaemonProcess) -> None:
    status = daemon.status()
    check_schema(status, "Status")
    until = status["pause"]["until"]
    assert status["paused"] is True and status["trainer"]["state"] == "paused" and status["trainer"]["pid"] is None
    assert 3000 < parse_utc_iso(until) - time.time() <= 3600
    assert daemon.stop() == 0
    daemon.start()
    status = daemon.status()
    assert status["paused"] is True and status["pause"]["until"] == until, status
    assert status["trainer"]["state"] == "paused"
    shown = daemon.hmctl("status").stdout
    assert "paused until" in shown and ("(in 59m" in shown or "(in 58m" in shown), shown


def test_timed_pause_that_ran_out_while_the_daemon_was_down_ends_at_start(daemon: DaemonProcess) -> None:
    result = daemon.hmctl("pause", "--for", "2h", "--json")  # replaces the hour; nothing runs, nothing to wait for
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    check_schema(answer, "PauseResult")
    assert daemon.stop() == 0
    saved = state_file(daemon)
    assert saved["pause_until"] == answer["pause"]["until"]
    # The machine stays off past the deadline: as if the clock had run on, the stored deadline is now behind us.
    saved["pause_until"] = utc_iso(time.time() - 60)
    (daemon.state_dir / "state.json").write_text(json.dumps(saved))
    daemon.start()
    wait_until(lambda: daemon.trainer()["state"] in ("starting", "running"), 60, "training to resume without asking")
    assert daemon.status()["paused"] is False and daemon.status()["pause"] is None
    assert state_file(daemon)["paused"] is False and state_file(daemon)["pause_until"] is None
    assert "pause over: resuming training" in "\n".join(trainer_log(daemon))


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
    every_steps = TEST_RUN["checkpoint"]["every_steps"]  # the run's checkpoint cadence: it did not run on to the next one
    assert checkpoint_step <= paused["checkpoint_step"] < checkpoint_step + every_steps
    status = daemon.status()
    assert status["paused"] is True and status["pause"]["after_checkpoint"] is False
    assert state_file(daemon)["pause_after_checkpoint"] is False
    assert "paused indefinitely" in daemon.hmctl("status").stdout


def test_timed_pause_ends_by_itself(daemon: DaemonProcess) -> None:
    notes = "\n".join(trainer_log(daemon)).count("pause over: resuming training")
    result = daemon.hmctl("pause", "--for", "3s")  # replaces the indefinite pause
    assert result.returncode == 0 and "paused until" in result.stdout and "(in 3s)" in result.stdout
    wait_until(lambda: "\n".join(trainer_log(daemon)).count("pause over: resuming training") > notes, 30,
               "the timed pause to end by itself")
    assert daemon.trainer()["state"] in ("starting", "running")
    assert daemon.status()["pause"] is None and state_file(daemon)["paused"] is False


def test_resume_cancels_a_timed_pause(daemon: DaemonProcess) -> None:
    assert daemon.hmctl("pause", "--for", "1h").returncode == 0
    assert 3590 < daemon.status()["pause"]["remaining_s"] <= 3600
    result = daemon.hmctl("resume")
    assert result.returncode == 0 and "resumed run pz" in result.stdout
    assert daemon.status()["paused"] is False and daemon.status()["pause"] is None
    assert json.loads((daemon.state_dir / "state.json").read_text())["pause_until"] is None
