"""The real trainer in a subprocess: events, SIGTERM, SIGKILL, resume order and exit codes.

A bootstrap DHT in the test process stands in for the host DHT of the daemon.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hivemindd.wire.launch import HostSettings, TrainerLaunch
from hivemindd.wire.spec import RunSpec

Event = dict[str, Any]

TINY_SPEC: dict[str, dict[str, Any]] = {
    "model": {"arch": "shufflenet_v2_x0_5", "num_classes": 10},
    "data": {"train": "demo://shapes/train", "train_samples": 4000, "image_size": 16},
    "optimizer": {"lr": 0.05, "target_batch_size": 64},
    "averaging": {"matchmaking_time": 1.0, "averaging_timeout": 5.0},
    "checkpoint": {"every_steps": 5},
}



def make_launch(tmp: Path, cache: Path, peers: list[str], name: str = "w", run_id: str | None = None,
                changes: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write a launch file for TINY_SPEC with ``changes`` ({section: {key: value}}) applied."""
    raw = {section: dict(values) for section, values in TINY_SPEC.items()}
    for section, values in (changes or {}).items():
        raw.setdefault(section, {}).update(values)
    launch = TrainerLaunch(
        run_id=run_id or f"test-{uuid.uuid4().hex[:8]}",
        spec=RunSpec.from_dict(raw),
        host=HostSettings(device="cpu", batch_size=8, workers=0),
        work_dir=str(tmp / name),
        cache_dir=str(cache),
        initial_peers=tuple(peers),
        metadata_expiration_s=10.0,
    )
    path = tmp / f"{name}.json"
    path.write_text(launch.to_json())
    return path


class Trainer:
    """One ``python -m hivemindd.trainer`` process and the events it sends."""

    def __init__(self, launch: Path, groups: list[int]) -> None:
        read_fd, write_fd = os.pipe()
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.log_path = launch.with_suffix(f".{int(time.time() * 1000)}.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hivemindd.trainer", "--launch", str(launch), "--events-fd", str(write_fd)],
                pass_fds=[write_fd], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        os.close(write_fd)
        groups.append(self.proc.pid)  # the session leader's pid is the process group id
        self.events: list[Event] = []
        self._queue: queue.Queue[Event | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(read_fd,), daemon=True)
        self._reader.start()

    def _read(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as pipe:
            for line in pipe:
                self._queue.put(json.loads(line))
        self._queue.put(None)  # EOF: every writer of the pipe is gone

    def wait_for(self, predicate: Callable[[Event], bool], timeout: float = 60.0) -> Event:
        """The first new event matching ``predicate``; fails on timeout or on the trainer's exit."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no matching event within {timeout}s; events: {self.events}\n{self.log_tail()}")
            try:
                event = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if event is None:
                self._queue.put(None)
                pytest.fail(f"event pipe closed before a matching event; events: {self.events}\n{self.log_tail()}")
            self.events.append(event)
            if predicate(event):
                return event

    def wait_type(self, type_: str, timeout: float = 60.0) -> Event:
        return self.wait_for(lambda e: e["type"] == type_, timeout)

    def wait_exit(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"trainer still running after {timeout}s\n{self.log_tail()}")

    def drain(self) -> list[Event]:
        """All events up to EOF (call after the process exited)."""
        while (event := self._queue.get(timeout=30)) is not None:
            self.events.append(event)
        return self.events

    def kill_group(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.mark.timeout(150)
def test_trains_checkpoints_stops_and_resumes(short_tmp: Path, demo_cache: Path, bootstrap: list[str],
                                              process_groups: list[int]) -> None:
    launch = make_launch(short_tmp, demo_cache, bootstrap)
    trainer = Trainer(launch, process_groups)
    started = trainer.wait_type("started")
    assert started["pid"] == trainer.proc.pid and started["peer_id"] and started["maddrs"]
    assert trainer.wait_type("resumed") == {"type": "resumed", "source": "fresh", "step": 0, "epoch": 0}
    checkpoint = trainer.wait_type("checkpoint")
    assert checkpoint["step"] == 5 and Path(checkpoint["path"]) == short_tmp / "w" / "checkpoints" / "latest.pt"
    # Global epochs advance: 64 samples a step of 8 samples each.
    progress = trainer.wait_for(lambda e: e["type"] == "progress" and e["epoch"] >= 1 and e["step"] > 10)
    assert set(progress) == {"type", "step", "epoch", "loss", "samples_per_s", "lr", "samples", "shards_failed",
                             "swarm_peers"}
    assert progress["swarm_peers"] == 1  # alone in its run
    assert progress["lr"] == pytest.approx(0.05) and progress["samples"] == 8 * progress["step"]
    steps = [e["step"] for e in trainer.events if e["type"] == "progress"]
    assert steps == sorted(steps) and len(set(steps)) >= 2

    trainer.proc.send_signal(signal.SIGTERM)
    assert trainer.wait_exit() == 0
    events = trainer.drain()
    stopped = events[-1]
    assert stopped["type"] == "stopped" and stopped["checkpoint_step"] == stopped["step"] >= progress["step"]
    last_checkpoint = [e for e in events if e["type"] == "checkpoint"][-1]
    assert last_checkpoint["step"] == stopped["step"]
    assert (short_tmp / "w" / "checkpoints" / "latest.pt").is_file()

    again = Trainer(launch, process_groups)
    resumed = again.wait_type("resumed")
    assert resumed["source"] == "checkpoint" and resumed["step"] == stopped["step"]
    assert resumed["epoch"] == last_checkpoint["epoch"]
    assert [e["type"] for e in again.events] == ["started", "resumed"]
    more = again.wait_for(lambda e: e["type"] == "progress" and e["step"] > stopped["step"])
    assert more["samples"] == 8 * more["step"]  # the sample counter survived the restart
    again.proc.send_signal(signal.SIGTERM)
    assert again.wait_exit() == 0
    assert again.drain()[-1]["type"] == "stopped"


@pytest.mark.timeout(150)
def test_sigkill_resumes_from_the_last_checkpoint(short_tmp: Path, demo_cache: Path, bootstrap: list[str],
                                                  process_groups: list[int]) -> None:
    launch = make_launch(short_tmp, demo_cache, bootstrap)
    trainer = Trainer(launch, process_groups)
    trainer.wait_for(lambda e: e["type"] == "checkpoint" and e["step"] >= 10)
    trainer.kill_group()
    last = max(e["step"] for e in trainer.events if e["type"] == "checkpoint")

    again = Trainer(launch, process_groups)
    resumed = again.wait_type("resumed")
    assert resumed["source"] == "checkpoint" and resumed["step"] >= last
    again.wait_for(lambda e: e["type"] == "checkpoint" and e["step"] > resumed["step"])
    again.proc.send_signal(signal.SIGTERM)
    assert again.wait_exit() == 0


@pytest.mark.timeout(150)
def test_newcomer_loads_state_from_peers(short_tmp: Path, demo_cache: Path, bootstrap: list[str],
                                         process_groups: list[int]) -> None:
    first = Trainer(make_launch(short_tmp, demo_cache, bootstrap, name="a"), process_groups)
    run_id = TrainerLaunch.from_json((short_tmp / "a.json").read_text()).run_id
    first.wait_for(lambda e: e["type"] == "progress" and e["epoch"] >= 2)

    second = Trainer(make_launch(short_tmp, demo_cache, bootstrap, name="b", run_id=run_id), process_groups)
    resumed = second.wait_type("resumed")
    assert resumed["source"] == "peers" and resumed["step"] == 0 and resumed["epoch"] >= 2
    second.wait_type("progress")
    for trainer in (second, first):
        trainer.proc.send_signal(signal.SIGTERM)
    for trainer in (second, first):
        assert trainer.wait_exit(90) == 0


@pytest.mark.parametrize(("changes", "key"), [
    ({"data": {"train": "/nonexistent/hmt/train-{0..3}.tar"}}, "data.train: no shards match"),
    ({"data": {"train": "file://otherhost/train-{0..3}.tar"}}, "data.train: file://otherhost/train-{0..3}.tar names host"),
    ({"model": {"arch": "resnet5"}}, "model.arch: 'resnet5' is not a torchvision model"),
])
@pytest.mark.timeout(60)
def test_configuration_errors_exit_2(short_tmp: Path, demo_cache: Path, process_groups: list[int],
                                     changes: dict[str, dict[str, Any]], key: str) -> None:
    trainer = Trainer(make_launch(short_tmp, demo_cache, [], changes=changes), process_groups)
    assert trainer.wait_exit() == 2
    events = trainer.drain()
    assert [e["type"] for e in events] == ["error"]
    assert events[0]["message"].startswith(key)


@pytest.mark.timeout(60)
def test_unreadable_launch_file_exits_2(short_tmp: Path, process_groups: list[int]) -> None:
    launch = short_tmp / "broken.json"
    launch.write_text("{not json")
    trainer = Trainer(launch, process_groups)
    assert trainer.wait_exit() == 2
    assert trainer.drain()[0]["message"].startswith(f"launch file {launch}")


def _catches_sigterm(pid: int) -> bool:
    """True once the process has installed its own SIGTERM handler (SigCgt in /proc/<pid>/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.timeout(120)
def test_stop_while_starting_exits_without_joining_the_swarm(short_tmp: Path, demo_cache: Path,
                                                             bootstrap: list[str], process_groups: list[int]) -> None:
    """A pause that lands while the trainer is still importing torch: out in seconds, no DHT, no swarm."""
    trainer = Trainer(make_launch(short_tmp, demo_cache, bootstrap), process_groups)
    deadline = time.monotonic() + 30
    while not _catches_sigterm(trainer.proc.pid):
        assert time.monotonic() < deadline and trainer.proc.poll() is None, trainer.log_tail()
        time.sleep(0.01)
    trainer.proc.send_signal(signal.SIGTERM)
    assert trainer.wait_exit() == 0
    assert [e["type"] for e in trainer.drain()] == ["stopped"]  # never "started": no DHT was made
    assert "stop requested before joining the swarm" in trainer.log_tail()
