"""Swarm view: progress records round-trip through real DHT nodes; totals; tolerant parsing."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hivemindd.hmctl.render import render_swarm
from hivemindd.host.dht import HostDHT
from hivemindd.host.swarm_view import ProgressRecord, SwarmView, activity, swarm_key, totals
from hivemindd.wire.spec import RunSpec


def spec(target_batch_size: int, train_samples: int, milestones: list[float]) -> RunSpec:
    return RunSpec.from_dict({"data": {"train": "/data/train-{0..3}.tar", "train_samples": train_samples},
                              "optimizer": {"target_batch_size": target_batch_size, "milestones": milestones}})


def record(peer: str, state: str = "running", step: int | None = 10, epoch: int = 4, rate: float = 50.0,
           top1: float | None = None) -> ProgressRecord:
    return ProgressRecord(peer_id=peer, hostname=f"host-{peer}", state=state, updated=time.time(), step=step,
                          epoch=epoch, samples_per_s=rate, loss=1.5, val_top1=top1, device="cpu")


def test_activity_words() -> None:
    assert activity("running", 3) == "training" and activity("running", None) == "starting"
    assert activity("paused", 3) == "paused" and activity("crashloop", 3) == "failing"
    assert activity("idle", None) == "bootstrap only" and activity(None, None) == "bootstrap only"


def test_totals_sum_training_peers_and_estimate_the_last_milestone() -> None:
    facts = spec(target_batch_size=100, train_samples=1000, milestones=[3.0, 6.0])
    got = totals([record("a", epoch=20, rate=40.0, top1=0.3), record("b", epoch=19, rate=60.0, top1=0.4),
                  record("c", state="paused", rate=99.0)], facts)
    assert got["peers"] == 3 and got["training"] == 2 and got["samples_per_s"] == 100.0
    assert got["global_epoch"] == 20 and got["dataset_epochs"] == 2.0 and got["best_val_top1"] == 0.4
    assert got["last_milestone"] == 6.0 and got["eta_s"] == pytest.approx(4.0 * 1000 / 100.0)
    assert totals([], facts)["eta_s"] is None


def test_wire_records_are_tolerant_and_checked() -> None:
    wire = record("a").to_wire() | {"future_field": [1, 2]}
    assert ProgressRecord.from_wire(wire) == record("a").__class__(**{**ProgressRecord.from_wire(wire).__dict__})  # type: ignore[union-attr]
    assert ProgressRecord.from_wire({"peer_id": "a"}) is None  # required fields missing
    assert ProgressRecord.from_wire(record("a").to_wire() | {"step": "ten"}) is None
    assert ProgressRecord.from_wire(record("a").to_wire() | {"loss": float("nan")}) is None
    assert ProgressRecord.from_wire([1]) is None


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[HostDHT, HostDHT]]:
    a = HostDHT(tmp_path / "a.key", ["/ip4/127.0.0.1/tcp/0"], [])
    b = HostDHT(tmp_path / "b.key", ["/ip4/127.0.0.1/tcp/0"], [])
    try:
        a.start([])
        b.start(a.maddrs)
        yield a, b
    finally:
        a.stop()
        b.stop()
        gc.collect()  # hivemind's DHT leaves its control pipes to the collector: let it warn here, not at exit


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_each_node_sees_both_records_through_the_dht(two_nodes: tuple[HostDHT, HostDHT]) -> None:
    a, b = two_nodes

    async def scenario() -> tuple[SwarmView, SwarmView]:
        views = []
        for node, state in ((a, "running"), (b, "paused")):
            own = record(node.peer_id, state=state)
            view = SwarmView(node.publish, node.read_signed, lambda own=own: ("demo", own), interval_s=1.0)
            views.append(view)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for view in views:
                await view.refresh()
            if all(len(v.records()) == 2 for v in views):
                break
            await asyncio.sleep(0.2)
        return views[0], views[1]

    view_a, _ = asyncio.run(scenario())
    assert {r.peer_id for r in view_a.records()} == {a.peer_id, b.peer_id}
    assert view_a.activity_of(b.peer_id) == "paused" and view_a.error is None
    snapshot = view_a.snapshot("demo", None, spec(64, 2000, [30.0]))
    assert snapshot["totals"]["training"] == 1 and snapshot["totals"]["peers"] == 2
    shown = render_swarm(snapshot)
    assert "1 of 2 peer(s) training" in shown and "paused" in shown and "host-" in shown
    records = asyncio.run(a.read_signed(swarm_key("demo")))
    assert set(records) == {a.peer_id, b.peer_id}


def test_a_dead_dht_keeps_the_last_view_and_says_why() -> None:
    async def failing_store(*_: object) -> bool:
        raise RuntimeError("the host DHT is not running")

    async def fetch(_: str) -> dict[str, object]:
        return {}

    view = SwarmView(failing_store, fetch, lambda: ("demo", record("a")))
    asyncio.run(view.refresh())
    assert view.error == "the host DHT is not running"
    assert [r.peer_id for r in view.records(record("a"))] == ["a"]
