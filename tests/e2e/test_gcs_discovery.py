"""Real daemons meeting through a bucket on fake-gcs-server: discovery, run specs, an outage."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gcs_emulator import GcsEmulator
from tests.support.daemons import daemon_at
from tests.support.specs import spec_toml
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(600)
DISCOVERY = "gs://test-bucket/swarm"


def test_daemons_meet_through_the_bucket_and_survive_an_outage(gcs: GcsEmulator, short_tmp: Path) -> None:
    with (daemon_at(short_tmp / "a", discovery=DISCOVERY) as a, daemon_at(short_tmp / "b", discovery=DISCOVERY) as b,
          daemon_at(short_tmp / "c", discovery=DISCOVERY) as c):
        daemons = [a, b, c]
        ids = {d.status()["peer_id"] for d in daemons}
        for d in daemons:
            others = ids - {d.status()["peer_id"]}
            wait_until(lambda d=d, others=others: others <= {p["peer_id"] for p in d.call("peers")}, 30,
                       f"{d.state_dir.name} to list the other two")
        discovery = a.status()["discovery"]  # one read: last_ok_s_ago moves between two
        assert (discovery["url"], discovery["state"]) == (DISCOVERY, "ok"), discovery

        spec = short_tmp / "tiny.toml"
        spec.write_text(spec_toml())
        assert a.hmctl("join", "--run-id", "gcsrun", "--spec", str(spec), "--device", "cpu").returncode == 0
        joined = c.hmctl("join", "--run-id", "gcsrun", "--device", "cpu", "--json")  # by run id alone
        assert joined.returncode == 0 and '"created": false' in joined.stdout, joined.stderr
        other = spec.with_name("other.toml")
        other.write_text(spec_toml({"optimizer": {"lr": 0.5}}))
        clash = b.hmctl("join", "--run-id", "gcsrun", "--spec", str(other))
        assert clash.returncode == 1 and "already exists with a different spec" in clash.stderr
        assert c.hmctl("pause").returncode == 0  # A's trainer alone is enough to see training go on
        c_id = c.status()["peer_id"]
        wait_until(lambda: [p for p in a.call("peers") if p["peer_id"] == c_id], 30, "A to list C in the run")

        wait_until(lambda: (a.status()["trainer"].get("step") or 0) > 0, 90, "A's trainer to take steps")
        gcs.stop()
        wait_until(lambda: a.status()["discovery"]["state"] == "degraded", 30, "A to report degraded")
        status = a.status()
        assert "cannot" in status["discovery"]["error"] and status["dht"]["alive"]
        assert [p["peer_id"] for p in a.call("peers")] == [c_id]  # keeps the peers it knew
        step = status["trainer"]["step"]
        wait_until(lambda: a.status()["trainer"]["step"] > step, 60, "A's trainer to keep training in the outage")
        assert a.status()["trainer"]["state"] == "running" and a.status()["discovery"]["state"] == "degraded"
        gcs.start()
        wait_until(lambda: a.status()["discovery"]["state"] == "ok", 60, "A to recover by itself")
