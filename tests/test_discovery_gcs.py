"""gs:// discovery against fake-gcs-server with the real google-cloud-storage client."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog

from hivemindd.discovery import DiscoveryError, PeerRecord, open_backend
from hivemindd.discovery.agent import DiscoveryAgent
from hivemindd.discovery.gcs import GcsBackend
from tests.gcs_emulator import GcsEmulator
from tests.support.waiting import wait_until
from tests.test_discovery import PEER_A, PEER_B, Capture, record


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_url_selects_the_gcs_backend(gcs: GcsEmulator) -> None:
    backend = open_backend("gs://test-bucket/swarm/a")
    assert isinstance(backend, GcsBackend) and backend.prefix == "swarm/a"


def test_records_round_trip_through_metadata_in_one_listing(gcs: GcsEmulator) -> None:
    backend = GcsBackend("gs://test-bucket/hm")
    run(backend.put(f"runs/demo/peers/{PEER_A}.json", record(PEER_A).to_json()))
    run(backend.put(f"runs/demo/peers/{PEER_B}.json", record(PEER_B).to_json()))
    run(backend.put("runs/other/peers/x.json", b"{}"))  # another run: not listed
    listed = run(backend.list("runs/demo/peers/"))
    assert sorted(o.key for o in listed) == [f"runs/demo/peers/{PEER_A}.json", f"runs/demo/peers/{PEER_B}.json"]
    assert {PeerRecord.from_json(o.body).peer_id for o in listed} == {PEER_A, PEER_B}
    assert all(o.age_s < 5 for o in listed)


def test_freshness_uses_the_store_clock_not_the_writer(gcs: GcsEmulator) -> None:
    backend = GcsBackend("gs://test-bucket/hm")
    wrong_clock = PeerRecord(**{**record(PEER_B).__dict__, "heartbeat": time.time() - 86400})  # a day behind
    run(backend.put(f"hosts/{PEER_B}.json", wrong_clock.to_json()))
    [obj] = run(backend.list("hosts/"))
    assert obj.age_s < 5  # fresh by the store's `updated`, whatever the writer's clock says


def test_spec_creation_is_create_only_under_concurrency(gcs: GcsEmulator) -> None:
    results: list[bool] = []
    bodies = [json.dumps({"who": i}).encode() for i in range(4)]

    def create(body: bytes) -> None:
        results.append(run(GcsBackend("gs://test-bucket/hm").create("runs/r/spec.json", body)))

    threads = [threading.Thread(target=create, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    winner = run(GcsBackend("gs://test-bucket/hm").get("runs/r/spec.json"))
    assert winner == bodies[results.index(True)] or winner in bodies
    assert run(GcsBackend("gs://test-bucket/hm").get("runs/absent/spec.json")) is None


def test_stale_records_are_collected_but_a_refreshed_one_is_kept(gcs: GcsEmulator) -> None:
    backend = GcsBackend("gs://test-bucket/hm")
    run(backend.put(f"hosts/{PEER_B}.json", record(PEER_B).to_json()))
    [listed] = run(backend.list("hosts/"))
    run(backend.put(f"hosts/{PEER_B}.json", record(PEER_B).to_json()))  # B refreshes meanwhile
    assert run(backend.delete(f"hosts/{PEER_B}.json", if_version=listed.version)) is False
    [current] = run(backend.list("hosts/"))
    assert run(backend.delete(f"hosts/{PEER_B}.json", if_version=current.version)) is True
    assert run(backend.list("hosts/")) == []


def test_agent_ignores_garbage_objects_and_collects_the_long_dead(gcs: GcsEmulator) -> None:
    from google.cloud import storage

    bucket = storage.Client().bucket("test-bucket")
    # Named like peer records (only those are ever deleted), and one that is not.
    no_metadata, junk_id, hostile_id = (f"Qm{c}" + PEER_B[3:] for c in "xyz")
    bucket.blob(f"hm/runs/demo/peers/{no_metadata}.json").upload_from_string(b"whatever")
    bucket.blob("hm/runs/demo/peers/notes.json").upload_from_string(b"someone else's")
    junk = bucket.blob(f"hm/runs/demo/peers/{junk_id}.json")
    junk.metadata = {"record": "\u0000{not json"}
    junk.upload_from_string(b"")
    hostile = bucket.blob(f"hm/runs/demo/peers/{hostile_id}.json")
    hostile.metadata = {"record": json.dumps({"peer_id": PEER_B, "maddrs": [f"/ip4/1.2.3.4/tcp/1/p2p/{PEER_B}"] * 40})}
    hostile.upload_from_string(b"")
    backend = GcsBackend("gs://test-bucket/hm")
    run(backend.put(f"runs/demo/peers/{PEER_B}.json", record(PEER_B).to_json()))
    capture = Capture()
    agent = DiscoveryAgent(backend, describe=lambda: record(PEER_A), on_new_peers=capture, heartbeat_s=1, ttl_s=10)
    with structlog.testing.capture_logs() as logs:
        run(agent.set_run("demo"))
        run(agent.heartbeat())
    assert [p["peer_id"] for p in agent.peers()] == [PEER_B]
    assert len([e for e in logs if e["event"] == "discovery.bad_record"]) == 4
    # Let everything age past 10 TTLs by the store's clock, then B alone refreshes before our next round.
    agent.ttl_s = 0.2
    wait_until(lambda: min(o.age_s for o in run(backend.list("runs/demo/peers/")) if PEER_A not in o.key) >= 2.5, 30,
               "every record but A's to be 2.5 s old by the store's clock")
    run(backend.put(f"runs/demo/peers/{PEER_B}.json", record(PEER_B).to_json()))
    run(agent.heartbeat())
    names = sorted(o.key.rsplit("/", 1)[1] for o in run(backend.list("runs/demo/peers/")))
    # Garbage named like records collected, the refreshed B kept, a name no peer has left alone.
    assert names == sorted([f"{PEER_A}.json", f"{PEER_B}.json", "notes.json"])


def test_outage_degrades_and_recovery_is_automatic(gcs: GcsEmulator) -> None:
    backend = GcsBackend("gs://test-bucket/hm")
    run(backend.put(f"hosts/{PEER_B}.json", record(PEER_B).to_json()))
    agent = DiscoveryAgent(backend, describe=lambda: record(PEER_A), on_new_peers=Capture(), heartbeat_s=1, ttl_s=30)
    run(agent.heartbeat())
    gcs.stop()
    with pytest.raises(DiscoveryError, match="cannot write"):
        run(agent.heartbeat())
    gcs.start()
    run(agent.heartbeat())
    assert agent.status()["state"] == "ok" and [p["peer_id"] for p in agent.peers()] == [PEER_B]


def test_missing_bucket_says_so(gcs: GcsEmulator) -> None:
    backend = GcsBackend("gs://no-such-bucket/hm")
    with pytest.raises(DiscoveryError, match=r"bucket gs://no-such-bucket does not exist"):
        run(backend.list("hosts/"))
    with pytest.raises(DiscoveryError, match=r"does not exist"):
        run(backend.get("runs/x/spec.json"))


def test_bad_urls_are_refused() -> None:
    with pytest.raises(DiscoveryError, match="expected gs://bucket/prefix"):
        GcsBackend("gs:///nobucket")


def test_record_too_big_for_metadata_is_refused(gcs: GcsEmulator, tmp_path: Path) -> None:
    with pytest.raises(DiscoveryError, match="metadata limit"):
        run(GcsBackend("gs://test-bucket/hm").put("hosts/x.json", b"x" * 8000))


def test_an_oversized_object_is_refused_and_an_empty_one_read(gcs: GcsEmulator) -> None:
    from google.cloud import storage

    bucket = storage.Client().bucket("test-bucket")
    bucket.blob("hm/runs/big/spec.json").upload_from_string(b"{" + b" " * 300_000 + b"}")
    bucket.blob("hm/runs/empty/spec.json").upload_from_string(b"")
    backend = GcsBackend("gs://test-bucket/hm")
    with pytest.raises(DiscoveryError, match=r"runs/big/spec\.json is over the 262144-byte limit"):
        run(backend.get("runs/big/spec.json"))
    assert run(backend.get("runs/empty/spec.json")) == b""


def test_a_listing_keeps_the_freshest_objects_and_says_once_it_was_cut(
        gcs: GcsEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    from hivemindd.discovery import gcs as gcs_backend

    monkeypatch.setattr(gcs_backend, "MAX_LISTED_OBJECTS", 3)
    backend = GcsBackend("gs://test-bucket/hm")
    names = [f"Qm{c}" + PEER_B[3:] for c in "abcde"]
    for name in names:
        run(backend.put(f"hosts/{name}.json", b"{}"))
    run(backend.put(f"hosts/{names[0]}.json", b"{}"))  # the first, refreshed: among the freshest now
    with structlog.testing.capture_logs() as logs:
        listed = run(backend.list("hosts/"))
        run(backend.list("hosts/"))
    assert len(listed) == 3 and f"hosts/{names[0]}.json" in {o.key for o in listed}
    assert [e["reason"] for e in logs if e["event"] == "discovery.listing_truncated"] == ["more than 3 objects"]
