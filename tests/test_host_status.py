"""What the Daemon's status and peers answers say, built on fakes of its parts (no DHT, no trainer)."""

from pathlib import Path
from typing import Any

from hivemindd.host.config import build_config
from hivemindd.host.control import HostControl
from hivemindd.host.observer import Observer
from hivemindd.host.reconciler import Reconciler
from hivemindd.host.state import DesiredState
from hivemindd.host.statedir import StatePaths
from hivemindd.host.swarm_view import ProgressRecord, SwarmView
from hivemindd.wire.launch import HostSettings
from hivemindd.wire.spec import parse_toml
from hivemindd.wire.status import TrainerStatus


class FakeAgent:
    def __init__(self, found: list[dict[str, Any]]) -> None:
        self.found = found

    def peers(self) -> list[dict[str, Any]]:
        return [dict(p) for p in self.found]

    def status(self) -> dict[str, Any]:
        return {"url": "file:///d", "state": "ok", "error": None, "last_ok_s_ago": 0.0, "failures": 0}


class FakeDHT:
    peer_id = "QmSelf"
    maddrs = ("/ip4/127.0.0.1/tcp/1/p2p/QmSelf",)
    alive = True
    restarts = 0
    last_death = None


class FakeSupervisor:
    def __init__(self, snapshot: dict[str, Any]) -> None:
        self._snapshot = snapshot

    def snapshot(self) -> TrainerStatus:
        return TrainerStatus.from_dict(self._snapshot)

    def error_lines(self) -> list[str]:
        return []


async def _nothing(*_: Any) -> Any:
    return {}


def daemon_with(tmp_path: Path, found: list[dict[str, Any]], trainer: dict[str, Any] | None = None) -> HostControl:
    """The control API's answers over fakes of the agent, the DHT and the supervisor."""
    cfg = build_config({"state_dir": str(tmp_path / "s")})
    paths = StatePaths(cfg.state_dir)
    agent, dht, supervisor = FakeAgent(found), FakeDHT(), FakeSupervisor(trainer or {"state": "stopped"})

    def own() -> tuple[str | None, ProgressRecord]:
        return None, ProgressRecord(peer_id="QmSelf", hostname="h", state="idle", updated=0.0)

    swarm = SwarmView(_nothing, _nothing, own)
    observer = Observer(paths, "h", lambda: "QmSelf", lambda: (None, {"state": "idle"}), swarm, None)
    reconciler = Reconciler(cfg, paths, DesiredState(), supervisor, agent, dht)  # type: ignore[arg-type]
    return HostControl(cfg, paths, "h", dht, agent, supervisor, observer, None, reconciler)  # type: ignore[arg-type]


def peer(peer_id: str, state: str) -> dict[str, Any]:
    return {"peer_id": peer_id, "maddrs": [], "age_s": 1.0, "hostname": peer_id, "state": state, "version": "x"}


def test_peers_without_a_progress_record_say_what_discovery_says(tmp_path: Path) -> None:
    """Issue 10: `hmctl peers` said "starting" for a peer whose record said its trainer was running."""
    daemon = daemon_with(tmp_path, [peer("QmRun", "running"), peer("QmStart", "starting"), peer("QmP", "paused"),
                                    peer("QmFail", "crashloop"), peer("QmIdle", "idle")])
    doing = {p["peer_id"]: p["activity"] for p in daemon.peers()}
    assert doing == {"QmRun": "training", "QmStart": "starting", "QmP": "paused", "QmFail": "failing",
                     "QmIdle": "bootstrap only"}


def test_status_names_the_global_step_and_the_dataset_epoch_it_makes(tmp_path: Path) -> None:
    """Status carries the dataset epoch next to the global step (the JSON's ``epoch``), so neither is guessed."""
    daemon = daemon_with(tmp_path, [], {"state": "running", "step": 1687, "epoch": 160, "loss": 0.2})
    spec = parse_toml('[data]\ntrain = "demo://shapes/train"\ntrain_samples = 2000\n'
                      '[optimizer]\ntarget_batch_size = 64\n', source="t.toml")
    daemon.paths.run_spec("r").parent.mkdir(parents=True)
    daemon.paths.run_spec("r").write_bytes(spec.to_json().encode())
    daemon.reconciler.desired = daemon.desired.joined("r", HostSettings())
    trainer = daemon.status()["trainer"]
    assert trainer["epoch"] == 160 and trainer["dataset_epoch"] == round(160 * 64 / 2000, 2)
    daemon.reconciler.desired = daemon.desired.left()
    assert daemon.status()["trainer"]["dataset_epoch"] is None
