"""File discovery: records, the backend, and the agent loop (freshness, garbage, GC, degraded)."""

import asyncio
import itertools
import json
import logging
import os
import time
from pathlib import Path

import pytest
import structlog

from hivemindd.discovery import PeerRecord, RecordError
from hivemindd.discovery.agent import DiscoveryAgent
from hivemindd.discovery.backend import DiscoveryError
from hivemindd.discovery.file import FileBackend

PEER_A = "QmX52hGGTZVKc1knuPUmgGF5v65EDh6zCC3VCMPiPd8eiE"
PEER_B = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


def record(peer_id: str, port: int = 4000) -> PeerRecord:
    return PeerRecord(peer_id=peer_id, maddrs=(f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id}",), hostname="h",
                      version="0.1.0", state="running", run_id="demo", heartbeat=time.time())


def test_record_round_trip_ignores_unknown_fields() -> None:
    raw = json.loads(record(PEER_A).to_json())
    raw["future_field"] = {"x": 1}
    assert PeerRecord.from_json(json.dumps(raw).encode()) == record(PEER_A).__class__(**{
        **record(PEER_A).__dict__, "heartbeat": raw["heartbeat"]})


@pytest.mark.parametrize("body, reason", [
    (b"\xff\xfe", "not JSON"),
    (b"[]", "not a JSON object"),
    (b'{"peer_id": "0OIl", "maddrs": ["/ip4/1.2.3.4/tcp/1/p2p/0OIl"]}', "not a base58 peer id"),
    (json.dumps({"peer_id": PEER_A, "maddrs": []}).encode(), "maddrs"),
    (json.dumps({"peer_id": PEER_A, "maddrs": ["not a maddr"]}).encode(), "not a multiaddr"),
    (json.dumps({"peer_id": PEER_A, "maddrs": [f"/ip4/1.2.3.4/tcp/1/p2p/{PEER_B}"]}).encode(), "does not end with"),
    (json.dumps({"peer_id": PEER_A, "maddrs": [f"/ip4/1.2.3.4/tcp/1/p2p/{PEER_A}"], "hostname": 5}).encode(),
     "hostname"),
    (b"{" + b" " * 20000 + b"}", "over the"),
    # Issue 11 item 8: what a record says reaches `hmctl peers`, /v1/peers and logs; no terminal escapes.
    (json.dumps({"peer_id": PEER_A, "maddrs": [f"/ip4/1.2.3.4/tcp/1/p2p/{PEER_A}"],
                 "hostname": "evil\x1b[2J"}).encode(), "hostname .* holds control characters"),
    (json.dumps({"peer_id": PEER_A, "maddrs": [f"/ip4/1.2.3.4/tcp/1/p2p/{PEER_A}"],
                 "state": "running\r\nINFO forged"}).encode(), "state .* holds control characters"),
    (json.dumps({"peer_id": PEER_A, "maddrs": [f"/ip4/1.2.3.4/tcp/1/p2p/{PEER_A}"],
                 "version": "1.0\u202e"}).encode(), "version .* holds control characters"),
    (json.dumps({"peer_id": PEER_A, "maddrs": [f"/ip4/1.2.3.4/tcp/1/p2p/{PEER_A}"],
                 "run_id": "demo\x07"}).encode(), "run_id .* holds control characters"),
])
def test_bad_records_are_rejected_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(RecordError, match=reason):
        PeerRecord.from_json(body)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_backend_create_is_create_only(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path.as_uri())
    assert run(backend.create("runs/r/spec.json", b"first")) is True
    assert run(backend.create("runs/r/spec.json", b"second")) is False
    assert run(backend.get("runs/r/spec.json")) == b"first"
    assert run(backend.get("runs/r/absent.json")) is None
    assert sorted(p.name for p in (tmp_path / "runs/r").iterdir()) == ["spec.json"]  # no temp files left


def test_backend_refuses_keys_outside_its_root(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    backend = FileBackend((tmp_path / "d").as_uri())
    with pytest.raises(Exception, match="escapes"):
        run(backend.put("../outside.json", b"x"))


def test_conditional_delete_spares_a_refreshed_record(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path.as_uri())
    key = f"hosts/{PEER_B}.json"
    run(backend.put(key, b"1"))
    [listed] = run(backend.list("hosts/"))
    os.utime(tmp_path / key, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))  # refreshed meanwhile
    assert run(backend.delete(key, if_version=listed.version)) is False
    assert (tmp_path / key).exists()
    [listed] = run(backend.list("hosts/"))
    assert run(backend.delete(key, if_version=listed.version)) is True


class Capture:
    def __init__(self) -> None:
        self.new: list[str] = []

    async def __call__(self, records: list[PeerRecord]) -> None:
        self.new += [r.peer_id for r in records]


def make_agent(root: Path, own: str = PEER_A, ttl: float = 10.0) -> tuple[DiscoveryAgent, Capture]:
    capture = Capture()
    agent = DiscoveryAgent(FileBackend(root.as_uri()), describe=lambda: record(own), on_new_peers=capture,
                           heartbeat_s=1.0, ttl_s=ttl)
    return agent, capture


def test_agent_sees_fresh_peers_ignores_garbage_and_collects_stale(tmp_path: Path) -> None:
    folder = tmp_path / "runs/demo/peers"
    folder.mkdir(parents=True)
    (folder / f"{PEER_B}.json").write_bytes(record(PEER_B).to_json())
    (folder / "garbage.json").write_bytes(b"\x00\x01 not json")
    (folder / "wrong.json").write_text(json.dumps({"peer_id": 5}))
    stale = folder / "QmStaLeStaLeStaLeStaLeStaLeStaLeStaLeStaLe1234.json"  # base58: a peer id's name
    stale.write_bytes(b"{}")
    old = time.time() - 1000  # 100 TTLs ago
    os.utime(stale, (old, old))
    expired = folder / "expired.json"
    expired.write_bytes(record("QmNWyoMPLVgg6o8v7jJbUrw4x6Y4vDrcDz5V8cFHjMp6Nh").to_json())
    old = time.time() - 30  # past the TTL, not yet garbage
    os.utime(expired, (old, old))

    agent, capture = make_agent(tmp_path)
    with structlog.testing.capture_logs() as logs:
        run(agent.set_run("demo"))
        run(agent.heartbeat())
        run(agent.heartbeat())
    assert [p["peer_id"] for p in agent.peers()] == [PEER_B]
    assert capture.new == [PEER_B]  # told once, not every heartbeat
    assert (folder / f"{PEER_A}.json").exists()  # own record written
    assert not stale.exists() and expired.exists()
    bad = [e for e in logs if e["event"] == "discovery.bad_record"]
    assert sorted(e["key"] for e in bad) == ["runs/demo/peers/garbage.json", "runs/demo/peers/wrong.json"]
    assert agent.status()["state"] == "ok"


def test_agent_moves_its_record_when_joining_and_withdraws_on_shutdown(tmp_path: Path) -> None:
    agent, _ = make_agent(tmp_path)
    run(agent.heartbeat())
    assert (tmp_path / f"hosts/{PEER_A}.json").exists()
    run(agent.set_run("demo"))
    run(agent.heartbeat())
    assert not (tmp_path / f"hosts/{PEER_A}.json").exists()
    assert (tmp_path / f"runs/demo/peers/{PEER_A}.json").exists()
    run(agent.withdraw())
    assert not (tmp_path / f"runs/demo/peers/{PEER_A}.json").exists()


def test_agent_degrades_and_recovers_keeping_known_peers(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    (root / "hosts").mkdir(parents=True)
    (root / f"hosts/{PEER_B}.json").write_bytes(record(PEER_B).to_json())
    agent, _ = make_agent(root)
    run(agent.heartbeat())
    moved = tmp_path / "moved"
    root.rename(moved)  # the shared directory disappears (unmounted)

    async def until_degraded() -> None:
        task = asyncio.create_task(agent.run())
        try:
            while agent.status()["state"] != "degraded":
                await asyncio.sleep(0.01)
        finally:
            task.cancel()

    run(asyncio.wait_for(until_degraded(), timeout=10))
    status = agent.status()
    assert "does not exist" in status["error"] and status["failures"] >= 1  # /metrics exports the count
    assert [p["peer_id"] for p in agent.peers()] == [PEER_B]  # keeps running on what it knew
    moved.rename(root)
    run(agent.heartbeat())
    assert agent.status()["state"] == "ok" and agent.status()["error"] is None and agent.status()["failures"] == 0


def test_unknown_scheme_is_a_clear_error() -> None:
    from hivemindd.discovery import DiscoveryError, open_backend

    with pytest.raises(DiscoveryError, match="unknown discovery URL"):
        open_backend("s3://bucket")


logging.getLogger("hivemind").setLevel(logging.WARNING)


def test_a_failing_dial_never_stops_the_heartbeat(tmp_path: Path) -> None:
    (tmp_path / "hosts").mkdir()
    (tmp_path / f"hosts/{PEER_B}.json").write_bytes(record(PEER_B).to_json())

    async def broken_dial(records: list[PeerRecord]) -> None:
        raise ModuleNotFoundError("No module named 'multiaddr'")

    agent = DiscoveryAgent(FileBackend(tmp_path.as_uri()), describe=lambda: record(PEER_A), on_new_peers=broken_dial,
                           heartbeat_s=0.01, ttl_s=10)

    async def scenario() -> None:
        task = asyncio.create_task(agent.run())
        own = tmp_path / f"hosts/{PEER_A}.json"
        while not own.exists():
            await asyncio.sleep(0.01)
        first = own.stat().st_mtime_ns
        while own.stat().st_mtime_ns == first:  # still rewriting its record after the failed dial
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    with structlog.testing.capture_logs() as logs:
        run(asyncio.wait_for(scenario(), timeout=10))
    assert any(e["event"] == "discovery.connect_failed" for e in logs)
    assert agent.status()["state"] == "ok"


def test_an_unexpected_store_exception_degrades_instead_of_killing_the_loop(tmp_path: Path) -> None:
    class Exploding(FileBackend):
        async def list(self, prefix: str) -> list:  # type: ignore[override,type-arg]
            raise RuntimeError("library bug")

    agent = DiscoveryAgent(Exploding(tmp_path.as_uri()), describe=lambda: record(PEER_A), on_new_peers=Capture(),
                           heartbeat_s=0.01, ttl_s=10)

    async def scenario() -> None:
        task = asyncio.create_task(agent.run())
        while agent.status()["state"] != "degraded":
            await asyncio.sleep(0.01)
        assert not task.done()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(asyncio.wait_for(scenario(), timeout=10))
    assert "library bug" in agent.status()["error"]


def test_a_peer_that_does_not_answer_is_redialed_with_backoff_until_it_does(tmp_path: Path) -> None:
    """A fresh record whose node is not up yet: the agent re-lists and dials again, then stops dialing."""
    (tmp_path / "hosts").mkdir()
    (tmp_path / f"hosts/{PEER_B}.json").write_bytes(record(PEER_B).to_json())
    dials: list[float] = []

    async def dial(records: list[PeerRecord]) -> list[str]:
        dials.append(time.monotonic())
        return [r.peer_id for r in records] if len(dials) >= 3 else []  # B's node answers from the third try

    # A long heartbeat: any retry before it comes from the dial backoff, not the heartbeat.
    agent = DiscoveryAgent(FileBackend(tmp_path.as_uri()), describe=lambda: record(PEER_A), on_new_peers=dial,
                           heartbeat_s=60.0, ttl_s=600.0)

    async def scenario() -> None:
        task = asyncio.create_task(agent.run())
        while len(dials) < 3:
            await asyncio.sleep(0.05)
        answered_at = len(dials)
        agent._wake.set()  # another heartbeat: B answered already, so it is not dialed again
        own = tmp_path / f"hosts/{PEER_A}.json"
        before = own.stat().st_mtime_ns
        while own.stat().st_mtime_ns == before:
            await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert len(dials) == answered_at

    with structlog.testing.capture_logs() as logs:
        run(asyncio.wait_for(scenario(), timeout=30))
    gaps = [b - a for a, b in itertools.pairwise(dials)]
    assert gaps[0] >= 1.0 and gaps[1] > gaps[0]  # backoff grows (2 s, 4 s, jittered ±20 %)
    assert sum(e["event"] == "discovery.dial_retry_later" for e in logs) == 2


def test_dials_are_batched_and_each_peer_is_dialed_once(tmp_path: Path) -> None:
    (tmp_path / "hosts").mkdir()
    peers = [f"Qm{chr(ord('a') + i)}" + PEER_B[3:] for i in range(11)]
    for pid in peers:
        (tmp_path / f"hosts/{pid}.json").write_bytes(record(pid).to_json())
    batches: list[list[str]] = []

    async def dial(records: list[PeerRecord]) -> None:
        batches.append([r.peer_id for r in records])

    agent = DiscoveryAgent(FileBackend(tmp_path.as_uri()), describe=lambda: record(PEER_A), on_new_peers=dial,
                           heartbeat_s=60.0, ttl_s=600.0)

    async def scenario() -> None:
        await agent.heartbeat()
        while agent._dialing:
            await asyncio.sleep(0.01)
        await agent.heartbeat()
        while agent._dialing:
            await asyncio.sleep(0.01)

    run(asyncio.wait_for(scenario(), timeout=10))
    assert sorted(len(b) for b in batches) == [3, 8]
    assert sorted(itertools.chain.from_iterable(batches)) == sorted(peers)


def test_dials_due_during_a_store_outage_do_not_hammer_the_store(tmp_path: Path) -> None:
    (tmp_path / "hosts").mkdir()
    (tmp_path / f"hosts/{PEER_B}.json").write_bytes(record(PEER_B).to_json())
    lists: list[float] = []

    class GoesDown(FileBackend):
        async def list(self, prefix: str) -> list:  # type: ignore[override,type-arg]
            lists.append(time.monotonic())
            if len(lists) > 1:
                raise DiscoveryError("store unreachable")
            return await super().list(prefix)

    async def unreachable(records: list[PeerRecord]) -> list[str]:
        return []

    agent = DiscoveryAgent(GoesDown(tmp_path.as_uri()), describe=lambda: record(PEER_A), on_new_peers=unreachable,
                           heartbeat_s=60.0, ttl_s=600.0)

    async def scenario() -> None:
        task = asyncio.create_task(agent.run())
        while agent.status()["state"] != "degraded":
            await asyncio.sleep(0.05)
        degraded_at = time.monotonic()
        while time.monotonic() - degraded_at < 4.0:  # long enough for a 1 s redial cadence to show
            await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(asyncio.wait_for(scenario(), timeout=30))
    # The outage backs off 2 s, then 4 s (±20 %): at most two more tries in 4 s, not one a second.
    assert len(lists) <= 4, [round(b - a, 1) for a, b in itertools.pairwise(lists)]
