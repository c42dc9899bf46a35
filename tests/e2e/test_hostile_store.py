"""A discovery store full of dead or hostile records: the daemon starts, stays up and stops (issue 11 items 2-3)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from hivemindd.discovery.records import PeerRecord
from tests.support.daemons import assert_no_process_left, daemon_at
from tests.support.dirs import short_dir
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(600)

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def fake_peer_id(n: int) -> str:
    """A well-formed peer id (sha2-256 multihash, base58) that no node holds."""
    value = int.from_bytes(b"\x12\x20" + hashlib.sha256(str(n).encode()).digest(), "big")
    out = ""
    while value:
        value, digit = divmod(value, 58)
        out = _B58[digit] + out
    return out


def plant(folder: Path, count: int, maddrs_per_record: int) -> None:
    """Fresh, valid records whose addresses lead nowhere: closed ports, another host's loopback."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        pid = fake_peer_id(n)
        maddrs = tuple(f"/ip4/127.0.0.1/tcp/{1 + (n + k) % 1000}/p2p/{pid}" for k in range(maddrs_per_record))
        record = PeerRecord(peer_id=pid, maddrs=maddrs, hostname=f"dead{n}", state="running", heartbeat=time.time())
        (folder / f"{pid}.json").write_bytes(record.to_json())


@pytest.fixture
def root() -> Iterator[Path]:
    with short_dir("hmh") as path:
        yield path


def test_a_daemon_starts_with_only_dead_records_in_the_store(root: Path) -> None:
    discovery = root / "discovery"
    plant(discovery / "hosts", 8, 32)  # what once made p2pd refuse to start: 8 × 32 dead bootstrap addresses
    with daemon_at(root / "a", "--ttl", "600", discovery=discovery) as daemon:  # the planted records stay fresh
        status = daemon.status()
        assert status["dht"]["alive"] and status["discovery"]["state"] in ("starting", "ok")
        wait_until(lambda: len([p for p in daemon.call("peers") if p["reachable"] is False]) == 8, 120,
                   "every dead record to be dialled and found unreachable", describe=daemon.log_tail)
        assert daemon.stop() == 0
    assert_no_process_left(root)


def test_a_flood_of_records_leaves_the_dht_alive_and_the_daemon_stoppable(root: Path) -> None:
    discovery = root / "discovery"
    plant(discovery / "hosts", 3000, 4)
    with daemon_at(root / "a", "--ttl", "600", discovery=discovery) as daemon:  # the planted records stay fresh
        own = daemon.status()["peer_id"]
        own_record = discovery / "hosts" / f"{own}.json"
        first = wait_until(lambda: own_record.exists() and own_record.stat().st_mtime, 60, "the host's own record")
        # Heartbeats go on while thousands of dials fail: the record keeps being refreshed.
        wait_until(lambda: own_record.stat().st_mtime > first and daemon.status()["discovery"]["state"] == "ok", 120,
                   "the host's record to be refreshed during the flood", describe=daemon.log_tail)
        wait_until(lambda: sum(p["reachable"] is False for p in daemon.call("peers")) >= 32, 180,
                   "dials of the planted records to go on", describe=daemon.log_tail)
        status = daemon.status()
        assert status["dht"]["alive"] and status["dht"]["restarts"] == 0
        assert daemon.stop(timeout=120) == 0
    assert_no_process_left(root)
    log = (root / "a" / "daemon.log").read_text()
    assert "UnpicklingError" not in log and "dht.died" not in log
    assert log.count("dht.dial_failed") <= 3000  # at most once per peer, not once per try


def test_a_dht_process_that_dies_is_restarted_shown_and_found_again(root: Path) -> None:
    """Issue 11 item 3: a dead DHT must not leave the host unreachable for good, and status must say it happened."""
    with daemon_at(root / "a") as a, daemon_at(root / "b") as b:
        a_id = a.status()["peer_id"]
        wait_until(lambda: [p for p in b.call("peers") if p["peer_id"] == a_id and p["reachable"]], 120,
                   "B to reach A's DHT node", describe=b.log_tail)
        before = a.status()
        entries = json.loads((root / "a" / "dht.pids").read_text())
        dht_pid = next(e["pid"] for e in entries if "p2pd" not in psutil.Process(e["pid"]).name())
        os.kill(dht_pid, signal.SIGKILL)  # the forked DHT process, as the OOM killer would
        after = wait_until(lambda: (s := a.status())["dht"]["restarts"] == 1 and s["dht"]["alive"] and s, 120,
                           "A's DHT to be restarted", describe=a.log_tail)
        assert after["peer_id"] == a_id, "the restarted node keeps the host's identity"
        assert "exit code" in (after["dht"]["last_death"] or ""), after["dht"]
        assert after["maddrs"] != before["maddrs"]  # a new port (tcp/0): the old addresses lead nowhere now
        # B learns A's new addresses from A's record and reaches the new node.
        wait_until(lambda: [p for p in b.call("peers") if p["peer_id"] == a_id and p["reachable"]
                            and p["maddrs"] == after["maddrs"]], 120, "B to reach A's restarted node",
                   describe=lambda: (b.call("peers"), a.log_tail(20)))
        assert a.hmctl("status").returncode == 0
        assert a.stop() == 0 and b.stop() == 0
    assert_no_process_left(root)
