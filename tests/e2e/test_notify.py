"""sd_notify without systemd: a datagram socket stands in for it, bound by the test."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from hivemindd.service.notify import Notifier, ServiceHeartbeat, status_line
from hivemindd.wire.status import HostStatus
from tests.support.daemons import daemon_at
from tests.support.specs import spec_toml
from tests.support.systemd import FakeSystemd
from tests.support.waiting import wait_until


@pytest.fixture
def fake_systemd(short_tmp: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(str(short_tmp / "notify"))
    yield fake
    fake.close()


# --- the protocol --------------------------------------------------------------------------------


def test_no_notify_socket_means_no_op_and_no_task() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    assert notifier.send(READY="1") is False

    async def go() -> None:
        heartbeat = ServiceHeartbeat(notifier, lambda: "idle")
        heartbeat.start()
        assert heartbeat._task is None  # foreground use costs nothing
        heartbeat.stopping()
        await heartbeat.close()

    asyncio.run(go())


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_datagrams_reach_path_and_abstract_sockets(short_tmp: Path, abstract: bool) -> None:
    address = f"@hivemindd-test-{os.getpid()}" if abstract else str(short_tmp / "notify")
    fake = FakeSystemd(address)
    try:
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": address})
        assert notifier.ready("idle, not joined")
        assert notifier.watchdog()
        assert notifier.stopping("stopping")
        notifier.close()
        wait_until(lambda: len(fake.snapshot()) >= 3, 10, "three datagrams")
        got = [fields for _, fields in fake.snapshot()]
        assert got == [{"READY": "1", "STATUS": "idle, not joined"}, {"WATCHDOG": "1"},
                       {"STOPPING": "1", "STATUS": "stopping"}]
        assert {pid for pid, _ in fake.snapshot()} == {os.getpid()}
    finally:
        fake.close()


def test_environment_is_consumed_and_checked() -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    notifier = Notifier.from_environment(env)
    assert env == {}, "children (trainer, DHT, p2pd) must not inherit the daemon's notify socket"
    assert notifier.address == "/run/systemd/notify"
    assert notifier.watchdog_s == 30.0
    # A watchdog meant for another process (inherited from a parent) is not ours.
    assert Notifier.from_environment({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_s is None
    assert Notifier.from_environment({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "soon"}).watchdog_s is None
    assert Notifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled is False


def test_a_full_queue_never_blocks_the_daemon(short_tmp: Path) -> None:
    """A manager that does not read (queues hold ~10 datagrams) makes sends fail fast, never hang the loop."""
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    deaf.bind(str(short_tmp / "deaf"))
    notifier = Notifier(str(short_tmp / "deaf"))
    try:
        results = [notifier.send(STATUS=f"line {i}") for i in range(5000)]
        assert results[0] is True
        assert False in results
    finally:
        notifier.close()
        deaf.close()


def test_a_vanished_socket_does_not_raise(short_tmp: Path) -> None:
    notifier = Notifier(str(short_tmp / "gone"))
    assert notifier.send(STATUS="x") is False  # logged, not raised: the daemon must stay up
    notifier.close()


def line(raw: dict[str, Any]) -> str:
    """The STATUS= line for a status answer as the API sends it (JSON)."""
    return status_line(HostStatus.from_dict(raw))


def test_status_line_says_what_a_person_wants_to_know() -> None:
    idle = {"run_id": None, "peers": 0, "trainer": {"state": "stopped"}, "dht": {"alive": True},
            "discovery": {"state": "ok"}}
    assert line(idle) == "idle, not joined"
    assert line({**idle, "discovery": {"state": "degraded"}}) == "idle, not joined (discovery degraded)"
    training = {**idle, "run_id": "imagenet-distributed", "peers": 3, "trainer": {"state": "running", "epoch": 12}}
    assert line(training) == "training imagenet-distributed, global step 12, 3 peers"
    crash = {**idle, "run_id": "r", "trainer": {"state": "crashloop", "last_error": "data.train: no shard readable\nTraceback"}}
    assert line(crash) == "crashloop: data.train: no shard readable"
    paused = {**idle, "run_id": "r", "paused": True, "pause": {"until": "2030-01-01T10:00:00Z"}}
    assert line(paused) == "paused until 2030-01-01T10:00:00Z, run r"
    assert line({**idle, "run_id": "r", "paused": True}) == "paused, run r"
    backoff = {**idle, "run_id": "r", "trainer": {"state": "backoff", "restarts": 2, "retry_in_s": 3.2}}
    assert line(backoff) == "restarting r after a failure (restarts: 2)"  # no countdown: it would change every tick


def test_heartbeat_sends_status_only_on_change_and_pings_from_the_loop(fake_systemd: FakeSystemd) -> None:
    summaries = iter(["idle, not joined"] * 3 + ["training r, global step 1, 0 peers"] * 1000)

    async def go() -> None:
        notifier = Notifier(fake_systemd.address, watchdog_usec=100_000)  # ping every 0.05 s
        heartbeat = ServiceHeartbeat(notifier, lambda: next(summaries))
        heartbeat.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(fake_systemd.values("WATCHDOG")) < 5:
            await asyncio.sleep(0.02)
        assert len(fake_systemd.values("WATCHDOG")) >= 5
        while time.monotonic() < deadline and "training r, global step 1, 0 peers" not in fake_systemd.values("STATUS"):
            await asyncio.sleep(0.02)
        # A wedged loop must not ping: at most the one already in flight arrives while the loop is blocked.
        before = len(fake_systemd.values("WATCHDOG"))
        time.sleep(0.3)  # the wedge itself (six ping periods), not a wait for a condition
        assert len(fake_systemd.values("WATCHDOG")) - before <= 1
        heartbeat.stopping()
        await asyncio.sleep(0.2)
        await heartbeat.close()

    asyncio.run(go())
    statuses = fake_systemd.values("STATUS")
    assert fake_systemd.snapshot()[0][1] == {"READY": "1", "STATUS": "idle, not joined"}
    assert statuses == ["idle, not joined", "training r, global step 1, 0 peers", "stopping: the trainer checkpoints first"]
    assert fake_systemd.values("STOPPING") == ["1"]
    # Pings go on after STOPPING=1: systemd still enforces the watchdog while the trainer checkpoints.
    stop_at = next(i for i, (_, f) in enumerate(fake_systemd.snapshot()) if "STOPPING" in f)
    assert any("WATCHDOG" in f for _, f in fake_systemd.snapshot()[stop_at:])


# --- the real daemon -----------------------------------------------------------------------------


def test_daemon_notifies_ready_status_watchdog_and_stopping(short_tmp: Path, fake_systemd: FakeSystemd,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd's view of a real daemon: READY once it answers, STATUS as things change, pings, STOPPING at SIGTERM."""
    discovery = short_tmp / "disc"  # missing at first: the daemon starts degraded and recovers by itself
    monkeypatch.setenv("NOTIFY_SOCKET", fake_systemd.address)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # what WatchdogSec=2 would set: a ping every second
    with daemon_at(short_tmp / "d", discovery=discovery) as daemon:
        assert daemon.proc is not None
        ready = fake_systemd.wait_for("READY", "1")
        assert daemon.client.reachable(), "READY=1 only once the control API answers"
        assert ready["STATUS"] == "idle, not joined (discovery degraded)"
        discovery.mkdir()
        fake_systemd.wait_for("STATUS", "idle, not joined", timeout=30)  # STATUS follows the recovery
        wait_until(lambda: len(fake_systemd.values("WATCHDOG")) >= 2, 30, "two watchdog pings (every 1 s)")

        spec = short_tmp / "t.toml"
        spec.write_text(spec_toml())
        joined = daemon.hmctl("join", "--run-id", "svc", "--spec", str(spec))
        assert joined.returncode == 0, joined.stderr
        fake_systemd.wait_for("STATUS", "training svc", timeout=120, prefix=True)
        trainer = psutil.Process(daemon.trainer()["pid"])
        assert "NOTIFY_SOCKET" not in trainer.environ(), "the trainer must not inherit the daemon's notify socket"

        assert daemon.stop(timeout=90) == 0
        stopping = [f for _, f in fake_systemd.snapshot() if "STOPPING" in f]
        assert stopping == [{"STOPPING": "1", "STATUS": "stopping: the trainer checkpoints first"}]
        # NotifyAccess=main: every datagram must come from the process systemd started (it never forks itself).
        assert {pid for pid, _ in fake_systemd.snapshot()} == {daemon.proc.pid}
