"""Hosts that arrive after a run started: they meet the swarm through discovery alone and train in it.

Neither daemon bootstraps from the other at start (a host not in a run reads only
the host list; the run's records are dialled once it joins), so every connection
here is made by the discovery agent's dial.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.daemons import DaemonProcess, daemon_at
from tests.support.dirs import short_dir
from tests.support.repo import check_schema
from tests.support.specs import spec_toml
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(900)


def swarm_ids(d: DaemonProcess) -> set[str]:
    return {p["peer_id"] for p in d.call("swarm")["peers"]}


def test_two_daemons_that_start_apart_meet_through_discovery_alone() -> None:
    with short_dir("hmm") as root, daemon_at(root / "a") as a, daemon_at(root / "b", start=False) as b:
        spec = root / "tiny.toml"
        spec.write_text(spec_toml())
        assert a.hmctl("join", "--run-id", "meet", "--spec", str(spec)).returncode == 0
        assert a.hmctl("pause").returncode == 0  # no trainer needed: the hosts' own DHT nodes meet
        b.start()  # A's record is under runs/meet/: B, not in a run, starts knowing nobody
        assert b.status()["peers"] == 0
        assert b.hmctl("join", "--run-id", "meet").returncode == 0
        assert b.hmctl("pause").returncode == 0
        a_id, b_id = a.status()["peer_id"], b.status()["peer_id"]
        for me, other in ((a, b_id), (b, a_id)):
            found = wait_until(lambda me=me, other=other: [p for p in me.call("peers")
                                                           if p["peer_id"] == other and p["reachable"]],
                               90, "each host to reach the other's DHT node", describe=me.log_tail)
            check_schema(found[0], "Peer")
        # Progress records travel through the hosts' DHT nodes only: both views show both hosts.
        for d in (a, b):
            wait_until(lambda d=d: swarm_ids(d) == {a_id, b_id}, 90, "both hosts in the swarm view",
                       describe=lambda d=d: d.call("swarm"))
        log = (root / "b" / "daemon.log").read_text()
        assert "dht.dial_failed" not in log, log  # every dial of a live peer worked the first time


def test_a_host_that_joins_a_running_run_trains_in_the_same_swarm() -> None:
    with short_dir("hml") as root, daemon_at(root / "a") as a, daemon_at(root / "b", start=False) as b:
        spec = root / "tiny.toml"
        spec.write_text(spec_toml())
        joined = a.hmctl("join", "--run-id", "late", "--spec", str(spec), "--batch-size", "16", "--device", "cpu")
        assert joined.returncode == 0, joined.stderr
        # A trains alone for a while: the run is well under way when B arrives.
        wait_until(lambda: (a.trainer().get("epoch") or 0) >= 3, 400, "A to reach global step 3 alone",
                   describe=a.trainer)
        b.start()
        joined = b.hmctl("join", "--run-id", "late", "--batch-size", "16", "--device", "cpu")
        assert joined.returncode == 0, joined.stderr
        a_id, b_id = a.status()["peer_id"], b.status()["peer_id"]

        def together() -> dict[str, Any] | None:
            ta, tb = a.trainer(), b.trainer()
            both = ta.get("swarm_peers") == 2 and tb.get("swarm_peers") == 2
            return {"a": ta, "b": tb} if both else None

        wait_until(together, 400, "both trainers to accumulate with 2 peers",
                   describe=lambda: (a.trainer(), b.trainer(), b.log_tail(20)))
        # B's global step caught up with A's: it joined the swarm's count, not a count of its own.
        start_a = a.trainer()["epoch"]
        wait_until(lambda: (b.trainer().get("epoch") or 0) >= start_a, 400, "B's global step to catch up with A's",
                   describe=lambda: (a.trainer(), b.trainer()))
        for d in (a, b):
            wait_until(lambda d=d: swarm_ids(d) == {a_id, b_id}, 90, "both hosts in the swarm view",
                       describe=lambda d=d: d.call("swarm"))
        shown = a.hmctl("status", "--swarm")
        assert shown.returncode == 0 and "2 peer(s)" in shown.stdout, shown.stdout
