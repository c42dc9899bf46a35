"""Two real daemons on loopback sharing a file:// discovery dir: the user journey of issue 2.

The tests run in file order against one swarm (starting trainers costs tens of
seconds on two cores); each leaves the swarm training as it found it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support.daemons import DaemonProcess, assert_no_process_left, daemon_at
from tests.support.dirs import short_dir
from tests.support.repo import check_schema
from tests.support.specs import spec_toml
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(900)


class Swarm:
    """Daemons A and B sharing ``root``'s discovery folder, and the run's spec file."""

    def __init__(self, root: Path, a: DaemonProcess, b: DaemonProcess) -> None:
        self.root = root
        self.discovery = root / "discovery"
        self.spec_file = root / "tiny.toml"
        self.spec_file.write_text(spec_toml())
        self.a, self.b = a, b


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    with short_dir("hm") as root, daemon_at(root / "a") as a, daemon_at(root / "b") as b:
        yield Swarm(root, a, b)


def running(d: DaemonProcess, min_step: int = 0) -> dict | None:  # type: ignore[type-arg]
    t = d.trainer()
    return t if t["state"] == "running" and (t["step"] or 0) >= min_step else None


def test_daemons_find_each_other_before_joining(swarm: Swarm) -> None:
    a_id = swarm.a.status()["peer_id"]
    b_id = swarm.b.status()["peer_id"]
    wait_until(lambda: [p for p in swarm.a.call("peers") if p["peer_id"] == b_id], 30, "A to list B")
    peers_b = wait_until(lambda: swarm.b.call("peers"), 30, "B to list A")
    assert peers_b[0]["peer_id"] == a_id and peers_b[0]["maddrs"] and peers_b[0]["age_s"] < 5
    for peer in peers_b:
        check_schema(peer, "Peer")
    check_schema(swarm.a.status(), "Status")


def test_spec_with_a_typo_is_refused_naming_the_key(swarm: Swarm) -> None:
    bad = swarm.root / "typo.toml"
    spec = spec_toml()
    bad.write_text(spec.replace("target_batch_size", "target_bacth_size"))
    result = swarm.a.hmctl("join", "--run-id", "typo", "--spec", str(bad))
    assert result.returncode == 1
    line = spec.splitlines().index("target_batch_size = 64") + 1
    assert f"{bad}:{line}: unknown key 'optimizer.target_bacth_size' (did you mean 'target_batch_size'?)" in result.stderr
    assert swarm.a.status()["run_id"] is None
    assert not (swarm.discovery / "runs" / "typo").exists()  # nothing published


def test_joining_an_unknown_run_says_how_to_create_it(swarm: Swarm) -> None:
    result = swarm.b.hmctl("join", "--run-id", "nosuchrun")
    assert result.returncode == 1 and "does not exist" in result.stderr and "--spec" in result.stderr


def test_bad_api_requests_get_4xx_naming_the_problem(swarm: Swarm) -> None:
    err = swarm.a.api_error("join", {"run_id": "../etc"})
    assert err.status == 400 and "run id" in str(err)
    check_schema(err.body, "Error")
    err = swarm.a.api_error("join", {"run_id": "x", "batch_sise": 3})
    assert err.status == 400 and "batch_sise" in str(err)
    err = swarm.a.api_error("join", {"run_id": "x", "batch_size": "big"})
    assert err.status == 400 and "batch_size must be an integer" in str(err)
    err = swarm.a.api_error("pause", {})
    assert err.status == 409 and "not in a run" in str(err)
    err = swarm.a.api_error("pause", {"forever": True})
    assert err.status == 400 and "forever" in str(err)
    for method, path, body, status in [("POST", "/v1/join", b"{not json", 400), ("GET", "/v2/status", None, 404),
                                       ("POST", "/v1/join", b"[1, 2]", 400), ("DELETE", "/v1/status", None, 405)]:
        got, reply = swarm.a.client.exchange(method, path, body)
        assert got == status
        check_schema(json.loads(reply), "Error")
    assert swarm.a.status()["dht"]["alive"]  # still up and answering


def test_two_hosts_train_together(swarm: Swarm) -> None:
    created = swarm.a.hmctl("join", "--run-id", "demo", "--spec", str(swarm.spec_file), "--batch-size", "16",
                            "--device", "cpu")
    assert created.returncode == 0, created.stderr
    assert "created and joined run demo" in created.stdout
    joined = swarm.b.hmctl("join", "--run-id", "demo", "--batch-size", "16", "--device", "cpu", "--json")
    assert joined.returncode == 0, joined.stderr
    assert '"created": false' in joined.stdout  # B fetched the spec A published

    wait_until(lambda: running(swarm.a, 3) and running(swarm.b, 3), 300, "both trainers to take steps")
    # The global epoch counts samples from every peer: once it exceeds what A alone could
    # have contributed, B's samples are in it.
    target = 64

    def b_contributes() -> bool:
        t = swarm.a.trainer()
        return t["epoch"] is not None and t["epoch"] * target > (t.get("samples") or t["step"] * 16) + target

    wait_until(b_contributes, 300, "the hivemind epoch to advance with samples from both hosts")
    status = swarm.a.status()
    assert status["run_id"] == "demo" and status["peers"] >= 1
    check_schema(status, "Status")
    check_schema(swarm.a.call("logs"), "Logs")
    assert swarm.b.status()["trainer"]["epoch"] >= 1


def test_kill9_trainer_restarts_and_resumes_from_its_checkpoint(swarm: Swarm) -> None:
    before = wait_until(lambda: (t := running(swarm.a)) and t["checkpoint_step"] and t, 120, "a first checkpoint")
    os.killpg(before["pid"], signal.SIGKILL)
    after = wait_until(lambda: (t := running(swarm.a)) and t["pid"] != before["pid"] and t["resumed_from"] and t,
                       300, "the trainer to be restarted")
    assert after["restarts"] == before["restarts"] + 1
    assert after["resumed_from"] == "checkpoint"
    assert after["step"] >= before["checkpoint_step"]
    assert not psutil.pid_exists(before["pid"]) or psutil.Process(before["pid"]).status() == psutil.STATUS_ZOMBIE


def test_pause_stops_the_trainer_and_resume_continues_from_the_checkpoint(swarm: Swarm) -> None:
    before = wait_until(lambda: running(swarm.b), 120, "B to run")
    assert swarm.b.hmctl("pause").returncode == 0
    paused = wait_until(lambda: (t := swarm.b.trainer())["state"] == "paused" and t, 60, "B to pause")
    assert paused["pid"] is None and not psutil.pid_exists(before["pid"])
    assert swarm.b.status()["paused"] is True
    checkpoint = paused["checkpoint_step"]
    assert checkpoint is not None and checkpoint >= before["step"]  # SIGTERM wrote a checkpoint
    assert swarm.b.hmctl("resume").returncode == 0
    resumed = wait_until(lambda: running(swarm.b, checkpoint + 1), 300, "B to train again")
    assert resumed["resumed_from"] == "checkpoint"


def test_daemon_restart_keeps_identity_run_and_pause(swarm: Swarm) -> None:
    before = swarm.b.status()
    assert swarm.b.hmctl("pause").returncode == 0
    wait_until(lambda: swarm.b.trainer()["state"] == "paused", 60, "B to pause")
    assert swarm.b.stop() == 0
    assert not (swarm.discovery / "runs/demo/peers" / f"{before['peer_id']}.json").exists()  # record withdrawn
    swarm.b.start()
    after = swarm.b.status()
    assert after["peer_id"] == before["peer_id"]
    assert after["run_id"] == "demo" and after["paused"] is True and after["trainer"]["state"] == "paused"
    assert swarm.b.hmctl("resume").returncode == 0
    wait_until(lambda: running(swarm.b), 300, "B to train after the daemon restart")


def test_garbage_in_the_discovery_dir_is_ignored(swarm: Swarm) -> None:
    peers_dir = swarm.discovery / "runs/demo/peers"
    (peers_dir / "junk.json").write_bytes(b"\x00\xffnot json at all")
    (peers_dir / "evil.json").write_text('{"peer_id": "QmX52hGGTZVKc1knuPUmgGF5v65EDh6zCC3VCMPiPd8eiE", '
                                         '"maddrs": ["/ip4/8.8.8.8/tcp/1/p2p/QmOther"]}')
    (peers_dir / "subdir").mkdir()
    b_id = swarm.b.status()["peer_id"]
    wait_until(lambda: [p for p in swarm.a.call("peers") if p["peer_id"] == b_id], 30, "A to list B")
    assert len(swarm.a.call("peers")) == 1
    wait_until(lambda: "discovery.bad_record" in (swarm.a.state_dir / "daemon.log").read_text(), 30,
               "A to warn about the bad records")
    assert swarm.a.status()["discovery"]["state"] == "ok"


def test_logs_show_the_trainer_output(swarm: Swarm) -> None:
    result = swarm.a.hmctl("logs", "-n", "10000")
    assert result.returncode == 0
    assert "trainer starting -> running: trainer reported ready" in result.stdout
    assert "trainer running -> backoff: exit code -9" in result.stdout  # the kill -9 earlier
    assert len(swarm.a.hmctl("logs", "-n", "3").stdout.splitlines()) == 3
    as_json = json.loads(swarm.a.hmctl("logs", "-n", "2", "--json").stdout)
    assert len(as_json["lines"]) == 2 and as_json["next"] > 0


def test_logs_follow_streams_new_lines_until_interrupted(swarm: Swarm) -> None:
    out = swarm.root / "follow.out"
    with open(out, "wb") as sink:
        follower = subprocess.Popen([sys.executable, "-m", "hivemindd.cli", "--socket", str(swarm.a.client.socket_path),
                                     "logs", "-f", "-n", "1"], stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: len(out.read_text().splitlines()) >= 3, 120, "new trainer log lines to stream")
    finally:
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=10) == 0


def test_clean_shutdown_leaves_no_process(swarm: Swarm) -> None:
    for d in (swarm.a, swarm.b):
        assert d.stop(timeout=90) == 0
    assert_no_process_left(swarm.root, timeout=30)
    assert not list((swarm.discovery / "runs/demo/peers").glob("Qm*.json"))  # both records withdrawn
