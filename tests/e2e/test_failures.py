"""The failure suite: what a long-running service meets, done to real daemons and trainers.

Each test owns one daemon (its own state dir, a file:// discovery folder) and a tiny
run, and checks what a user relies on: the trainer comes back and resumes from its
checkpoint, no step beyond ``every_steps`` is lost, no second trainer ever runs, and
nothing (trainer, DHT, p2pd) outlives the daemon that owned it.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, suppress
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.daemons import DaemonProcess, assert_no_process_left, daemon_at, processes_left
from tests.support.specs import spec_toml
from tests.support.waiting import wait_until

EVERY_STEPS = 5
# Smaller still than the daemon tests' run: trainers start and stop dozens of times here.
FAST_RUN: dict[str, Any] = {"model": {"arch": "shufflenet_v2_x0_5"}, "data": {"val": None, "image_size": 16},
                            "averaging": {"averaging_timeout": 5.0}, "checkpoint": {"every_steps": EVERY_STEPS},
                            "validation": None}
FAST_SPEC = spec_toml(FAST_RUN)


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[DaemonProcess]:
    (short_tmp / "run.toml").write_text(FAST_SPEC)
    with daemon_at(short_tmp / "d") as d:
        yield d
    assert_no_process_left(short_tmp)  # killed if a failing test left any, and then a failure of its own


def join(d: DaemonProcess) -> None:
    spec = d.state_dir.parent / "run.toml"
    done = d.hmctl("join", "--run-id", "fail", "--spec", str(spec), "--device", "cpu", "--batch-size", "8")
    assert done.returncode == 0, done.stderr


def running(d: DaemonProcess, min_step: int = 0) -> dict[str, Any] | None:
    t: dict[str, Any] = d.trainer()
    return t if t["state"] == "running" and (t["step"] or 0) >= min_step else None


class TrainerCensus:
    """Samples the process table in the background: the most trainer process groups alive at once."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = str(state_dir)
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> TrainerCensus:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            groups = set()
            for proc in psutil.process_iter(["cmdline", "status"]):
                with suppress(psutil.Error, ProcessLookupError):
                    cmd = " ".join(proc.info["cmdline"] or [])
                    if ("hivemindd.trainer" in cmd and self.state_dir in cmd
                            and proc.info["status"] != psutil.STATUS_ZOMBIE):
                        groups.add(os.getpgid(proc.pid))
            self.most = max(self.most, len(groups))


@pytest.mark.timeout(400)
def test_kill9_trainer_five_times_resumes_each_time(daemon: DaemonProcess) -> None:
    join(daemon)
    rng = random.Random(7)
    with TrainerCensus(daemon.state_dir) as census:
        for kill in range(5):
            # This trainer process took steps of its own (the step shown is kept from the last one until it
            # reports), and there is a checkpoint to resume from.
            before = wait_until(lambda: (t := running(daemon)) and t["run_steps"] and t["checkpoint_step"] is not None
                                and t, 180, f"the trainer to train and checkpoint before kill {kill + 1}",
                                describe=daemon.trainer)
            time.sleep(rng.uniform(0.0, 3.0))  # a random moment in the training (not waiting for anything)
            last = daemon.trainer()
            assert last["pid"] == before["pid"]
            os.kill(before["pid"], signal.SIGKILL)  # the trainer's main process, as the OOM killer would
            old_pid = before["pid"]
            after = wait_until(lambda p=old_pid: (t := running(daemon)) and t["pid"] != p and t["resumed_from"]
                               and t, 180, f"the trainer to come back after kill {kill + 1}",
                               describe=daemon.trainer)
            assert after["resumed_from"] == "checkpoint"
            assert after["restarts"] == before["restarts"] + 1
            lost = (last["step"] or 0) - after["checkpoint_step"]
            assert lost <= EVERY_STEPS, f"kill {kill + 1}: {lost} steps lost (seen {last['step']}, " \
                                        f"resumed from {after['checkpoint_step']})"
    assert census.most == 1  # never two trainers at once


@pytest.mark.timeout(300)
def test_kill9_daemon_leaves_nothing_behind_and_the_next_one_resumes(daemon: DaemonProcess) -> None:
    join(daemon)
    before = wait_until(lambda: (t := running(daemon, 1)) and t["checkpoint_step"] is not None and t, 180,
                        "a first checkpoint")
    assert daemon.proc is not None
    daemon_proc = psutil.Process(daemon.proc.pid)
    left_behind = [p.pid for p in daemon_proc.children(recursive=True)]  # its DHT, p2pd, the trainer group
    assert len(left_behind) >= 3
    daemon_proc.kill()  # SIGKILL: nothing of the daemon runs to clean up
    daemon.proc.wait(10)

    daemon.start()
    status = daemon.status()
    assert status["run_id"] == "fail"  # desired state restored from disk
    for pid in left_behind:  # the new daemon ended every orphan before starting its own
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid
    after = wait_until(lambda: (t := running(daemon)) and t["resumed_from"] and t, 180, "training to resume")
    assert after["resumed_from"] == "checkpoint" and after["step"] >= before["checkpoint_step"]


@pytest.mark.timeout(300)
def test_sigterm_checkpoints_withdraws_and_exits_in_time(daemon: DaemonProcess) -> None:
    join(daemon)
    wait_until(lambda: running(daemon, EVERY_STEPS + 1), 180, "the trainer to take steps")
    peer_id = daemon.status()["peer_id"]
    record = daemon.state_dir.parent / "discovery" / "runs" / "fail" / "peers" / f"{peer_id}.json"
    assert record.exists()
    last = daemon.trainer()
    started = time.monotonic()
    assert daemon.stop(timeout=60) == 0  # the daemon's stop timeout is 30 s here (DaemonProcess)
    assert time.monotonic() - started < 30
    assert not record.exists()  # withdrawn from discovery
    latest = daemon.state_dir / "runs" / "fail" / "checkpoints" / "latest.pt"
    assert latest.exists()
    import torch

    payload = torch.load(latest, map_location="cpu", weights_only=True)
    assert payload["step"] >= last["step"]  # written at the stop, not an older one
    assert not processes_left(daemon.state_dir)


@pytest.mark.timeout(900)  # 20 trainer start-ups: about 2-3 min, far more when the two cores are shared
def test_pause_resume_twenty_times_leaks_nothing(daemon: DaemonProcess) -> None:
    join(daemon)
    wait_until(lambda: running(daemon, 1), 180, "the trainer to take steps")
    assert daemon.proc is not None
    daemon_proc = psutil.Process(daemon.proc.pid)
    fds_before = daemon_proc.num_fds()
    with TrainerCensus(daemon.state_dir) as census:
        for cycle in range(20):
            assert daemon.hmctl("pause").returncode == 0
            paused = wait_until(lambda: (t := daemon.trainer())["state"] == "paused" and t, 90,
                                f"pause {cycle + 1} to take effect")
            assert paused["pid"] is None
            assert daemon.hmctl("resume").returncode == 0
            if cycle % 10 == 9:  # now and then, let it train and check nothing was lost
                checkpoint = paused["checkpoint_step"] or 0
                back = wait_until(lambda: (t := running(daemon)) and t["resumed_from"] and t, 180,
                                  f"training after resume {cycle + 1}")
                assert back["step"] >= checkpoint  # resumed from (at least) the checkpoint written at pause
            else:  # pause again while it starts: a trainer asked to stop then must not join the swarm first
                wait_until(lambda: daemon.trainer()["state"] in ("starting", "running"), 30,
                           f"resume {cycle + 1} to start a trainer")
    assert census.most == 1
    assert daemon.hmctl("pause").returncode == 0
    wait_until(lambda: daemon.trainer()["state"] == "paused", 90, "the last pause")
    trainers = [p for p in daemon_proc.children(recursive=True) if "hivemindd.trainer" in " ".join(p.cmdline())]
    assert trainers == []
    assert daemon_proc.num_fds() <= fds_before + 2, "the daemon leaks file descriptors across pause/resume"


def other_daemon(short_tmp: Path, *extra: str) -> AbstractContextManager[DaemonProcess]:
    """A daemon with non-default settings, for the tests that need them; reaped on the way out."""
    (short_tmp / "run.toml").write_text(FAST_SPEC)
    return daemon_at(short_tmp / "d", *extra)


@pytest.mark.timeout(300)
def test_a_trainer_that_cannot_start_crashloops_without_spinning_and_recovers_once_fixed(
        short_tmp: Path, demo_cache: Path) -> None:
    from hivemindd.trainer.demo_data import ensure_demo_shards

    cooldown = 12.0
    with other_daemon(short_tmp, "--crashloop-cooldown", str(cooldown)) as daemon:
        data = short_tmp / "data"  # not there yet: the owner has not copied the shards
        spec = daemon.state_dir.parent / "run.toml"
        spec.write_text(spec_toml({**FAST_RUN, "data": {**FAST_RUN["data"], "train": f"{data}/train-{{00000..00007}}.tar"}}))
        join(daemon)
        parked = wait_until(lambda: (t := daemon.trainer())["state"] == "crashloop" and t, 120, "crashloop")
        assert "data.train" in parked["last_error"] and "no shards match" in parked["last_error"]
        assert parked["retry_in_s"] is not None and parked["retry_in_s"] <= cooldown
        hm = daemon.hmctl("status")
        assert "crashloop" in hm.stdout and "no shards match" in hm.stdout, hm.stdout

        # No busy loop: over 30 s a parked trainer is tried at most once per cooldown.
        started = time.monotonic()
        spawned_before = _spawns(daemon)
        wait_until(lambda: time.monotonic() - started > 30, 40, "30 s to pass", interval=1.0)
        assert _spawns(daemon) - spawned_before <= 30 / cooldown + 1

        shutil.copytree(Path(ensure_demo_shards(demo_cache).train).parent, data)  # the owner fixes the cause
        back = wait_until(lambda: running(daemon, 1), 120, "the trainer to recover by itself")
        assert back["last_error"] is None


def _spawns(daemon: DaemonProcess) -> int:
    return (daemon.state_dir / "daemon.log").read_text(errors="replace").count("trainer.spawned")


@pytest.mark.timeout(300)
def test_a_hung_trainer_is_killed_restarted_and_reported(short_tmp: Path) -> None:
    # Long enough for a start-up on two busy cores (imports, model, DHT: no event meanwhile), short for a test.
    with other_daemon(short_tmp, "--hang-timeout", "20") as daemon:
        join(daemon)
        before = wait_until(lambda: running(daemon, 1), 180, "the trainer to take steps", describe=daemon.trainer)
        os.kill(before["pid"], signal.SIGSTOP)  # frozen: alive, but sends nothing
        after = wait_until(lambda: (t := running(daemon)) and t["pid"] != before["pid"] and t, 120,
                           "the hung trainer to be replaced")
        assert after["restarts"] == before["restarts"] + 1
        log_text = (daemon.state_dir / "logs" / "trainer.log").read_text()  # what hmctl logs shows
        assert re.search(r"trainer sent nothing for 2\d s \(hang_timeout 20 s\): killing it", log_text)
        assert not psutil.pid_exists(before["pid"]) or psutil.Process(before["pid"]).status() == psutil.STATUS_ZOMBIE
