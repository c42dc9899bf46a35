"""The host DHT against real hivemind nodes: dialling discovered peers, signed records, a dead or flooded node."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from hivemindd.host.dht import MAX_DIAL_ADDRS, HostDHT, dial_addresses, peer_id_of_owner
from hivemindd.host.swarm_view import ProgressRecord, SwarmView, swarm_key
from tests.support.waiting import wait_until

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[HostDHT]]:
    """Two host nodes that started apart: neither was told of the other."""
    started: list[HostDHT] = []
    try:
        for name in ("a", "b"):
            node = HostDHT(tmp_path / f"{name}.key", LOOPBACK, [], tmp_path / f"{name}.pids")
            node.start()
            started.append(node)
        yield started
    finally:
        for node in started:
            node.stop()
        gc.collect()  # hivemind leaves its control pipes to the collector: let it warn here


def progress(peer_id: str, **extra: object) -> ProgressRecord:
    return ProgressRecord(peer_id=peer_id, hostname="h", state="running", updated=time.time(), step=1,
                          epoch=1, **extra)  # type: ignore[arg-type]


def test_dial_addresses_drop_the_peer_id_and_foreign_loopback() -> None:
    pid = "QmRKrVw3y6Sruyki98xTvyJQz7vY3RRb9phXy1AVzmYxwd"
    maddrs = [f"/ip4/127.0.0.1/tcp/1/p2p/{pid}", f"/ip4/203.0.113.7/tcp/31337/p2p/{pid}", f"/ip6/::1/tcp/2/p2p/{pid}"]
    assert dial_addresses(maddrs, loopback_ok=True) == ["/ip4/127.0.0.1/tcp/1", "/ip4/203.0.113.7/tcp/31337",
                                                        "/ip6/::1/tcp/2"]
    assert dial_addresses(maddrs, loopback_ok=False) == ["/ip4/203.0.113.7/tcp/31337"]
    many = [f"/ip4/203.0.113.{i}/tcp/1/p2p/{pid}" for i in range(40)]
    assert len(dial_addresses(many, loopback_ok=False)) == MAX_DIAL_ADDRS


def test_a_node_dials_a_peer_it_found_in_a_record_and_they_share_records(nodes: list[HostDHT]) -> None:
    a, b = nodes
    # As discovery hands them over: the record's multiaddrs, each ending in /p2p/<peer id>.
    assert all(m.endswith(f"/p2p/{b.peer_id}") for m in b.maddrs)

    async def scenario() -> tuple[list[str], dict[str, object]]:
        answered = await a.connect([(b.peer_id, b.maddrs)])
        await b.publish(swarm_key("demo"), progress(b.peer_id).to_wire(), time.time() + 60)
        deadline = time.monotonic() + 60
        seen: dict[str, object] = {}
        while time.monotonic() < deadline and b.peer_id not in seen:
            seen = await a.read_signed(swarm_key("demo"))
            await asyncio.sleep(0.2)
        return answered, seen

    answered, seen = asyncio.run(scenario())
    assert answered == [b.peer_id]
    assert b.peer_id in seen  # b's record reached a through the DHT they now share


def test_a_dial_that_fails_says_why_once(nodes: list[HostDHT], tmp_path: Path) -> None:
    a, b = nodes
    gone = b.peer_id
    dead = [f"/ip4/127.0.0.1/tcp/9/p2p/{gone}"]  # the discard port: nothing listens

    async def twice() -> list[list[str]]:
        return [await a.connect([(gone, dead)]) for _ in range(2)]

    with capture_logs() as logs:
        results = asyncio.run(twice())
    assert results == [[], []]
    failed = [e for e in logs if e["event"] == "dht.dial_failed" and e["log_level"] == "info"]
    assert len(failed) == 1 and failed[0]["peer_id"] == gone and failed[0]["reason"]


def test_signed_records_cannot_be_forged_under_another_peers_id(nodes: list[HostDHT], tmp_path: Path) -> None:
    """A plain hivemind client writes the swarm key as the old code did (subkey = a victim's peer id), and
    with a key of its own while claiming to be the victim: neither reaches the reader."""
    import hivemind
    from hivemind.dht.crypto import RSASignatureValidator

    a, b = nodes
    key = swarm_key("demo")
    forger_signer = RSASignatureValidator()
    forger = hivemind.DHT(initial_peers=a.maddrs, host_maddrs=LOOPBACK, record_validators=[forger_signer], start=True)
    try:
        spoof = progress(b.peer_id, device="SPOOFED").to_wire()
        assert forger.store(key, spoof, time.time() + 60, subkey=b.peer_id)
        assert forger.store(key, spoof, time.time() + 60, subkey=forger_signer.local_public_key)
        assert peer_id_of_owner(forger_signer.local_public_key) != b.peer_id

        async def scenario() -> tuple[dict[str, object], list[ProgressRecord]]:
            await a.connect([(b.peer_id, b.maddrs)])
            await b.publish(key, progress(b.peer_id, device="cpu").to_wire(), time.time() + 60)
            view = SwarmView(a.publish, a.read_signed, lambda: ("demo", progress(a.peer_id)), interval_s=1.0)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                await view.refresh()
                if b.peer_id in {r.peer_id for r in view.records()}:
                    break
                await asyncio.sleep(0.2)
            return await a.read_signed(key), view.records()

        signed, records = asyncio.run(scenario())
    finally:
        forger.shutdown()
    forged_signer = peer_id_of_owner(forger_signer.local_public_key)
    assert b.peer_id in signed and signed[b.peer_id]["device"] == "cpu"  # type: ignore[index]
    by_peer = {r.peer_id: r for r in records}
    assert by_peer[b.peer_id].device == "cpu"  # the genuine record, never the spoofed one
    assert forged_signer not in by_peer  # signed by the forger, but claiming b's id


def test_the_swarm_view_shows_only_peers_discovery_vouches_for() -> None:
    async def store(*_: object) -> bool:
        return True

    fake = progress("fake", samples_per_s=1e6)

    async def fetch(_: str) -> dict[str, object]:
        return {"a": progress("a").to_wire(), "b": progress("b").to_wire(), "fake": fake.to_wire()}

    view = SwarmView(store, fetch, lambda: ("demo", progress("a")), vouched=lambda peer: peer in ("a", "b"))
    asyncio.run(view.refresh())
    assert {r.peer_id for r in view.records()} == {"a", "b"}


def test_bounds_on_what_a_progress_record_may_say() -> None:
    good = progress("a").to_wire()
    assert ProgressRecord.from_wire(good) is not None
    assert ProgressRecord.from_wire(good | {"device": "x" * 3000}) is None
    assert ProgressRecord.from_wire(good | {"hostname": "evil\x1b[2Jhost"}) is None
    assert ProgressRecord.from_wire(good | {"samples_per_s": 1e12}) is None
    assert ProgressRecord.from_wire(good | {"val_top1": 100.0}) is None
    assert ProgressRecord.from_wire(good | {"step": -5}) is None


def test_a_flood_of_concurrent_calls_leaves_the_dht_alive(nodes: list[HostDHT]) -> None:
    """Threads writing hivemind's pipe at once used to corrupt it and kill the DHT process."""
    a, _ = nodes

    async def flood() -> list[object]:
        calls = [a.read_signed(swarm_key("demo")) for _ in range(100)]
        calls += [a.publish(swarm_key("demo"), progress(a.peer_id).to_wire(), time.time() + 60) for _ in range(50)]
        return await asyncio.gather(*calls)

    results = asyncio.run(flood())
    assert len(results) == 150 and a.alive
    assert a.peer_id in asyncio.run(a.read_signed(swarm_key("demo")))


def test_a_dead_dht_is_restarted_and_a_dead_one_still_stops(nodes: list[HostDHT]) -> None:
    a, _ = nodes
    os.kill(a._dht.pid, signal.SIGKILL)
    wait_until(lambda: not a.alive, 30, "the killed DHT process to be seen dead", interval=0.1)
    assert a.restart_if_dead() and a.alive and a.restarts == 1 and a.last_death
    assert a.peer_id in asyncio.run(_published_and_read(a))  # the new node works
    os.kill(a._dht.pid, signal.SIGKILL)
    a.stop()  # returns, though the DHT it stops is dead
    assert not a.alive


async def _published_and_read(node: HostDHT) -> dict[str, object]:
    await node.publish(swarm_key("x"), progress(node.peer_id).to_wire(), time.time() + 60)
    return await node.read_signed(swarm_key("x"))


def test_unreachable_initial_peers_do_not_keep_the_node_from_starting(tmp_path: Path, nodes: list[HostDHT]) -> None:
    _, b = nodes
    node = HostDHT(tmp_path / "c.key", LOOPBACK, [])
    try:
        node.start([f"/ip4/127.0.0.1/tcp/9/p2p/{b.peer_id}"])
        assert node.alive
    finally:
        node.stop()
