"""``GET /v1/status`` as types: what the daemon reports about its host and its trainer.

The daemon builds a ``HostStatus`` (host/control.py, from the supervisor's
``TrainerStatus``), the API sends ``to_dict()``, and every reader turns the JSON
back with ``from_dict`` — hmctl's status view, sd_notify's STATUS line, the
Prometheus export and the swarm view's own record — instead of spelling keys
again. ``from_dict`` is tolerant: unknown keys are ignored (a newer daemon) and
missing ones take their defaults (an older one). ``openapi.yaml`` describes the
same fields for other clients; a test keeps the two in step. Standard library only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Self


def _known(cls: type, raw: Any) -> dict[str, Any]:
    """The keys of ``raw`` that ``cls`` has fields for (a newer daemon may send more; a non-dict gives none)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k in names} if isinstance(raw, dict) else {}


class _Tolerant:
    """``from_dict``: a part of the status from its JSON, unknown keys ignored, missing ones defaulted."""

    @classmethod
    def from_dict(cls, raw: Any) -> Self:
        return cls(**_known(cls, raw))


@dataclass(frozen=True)
class TrainerStatus(_Tolerant):
    """``status.trainer``: where the supervisor has this host's trainer and what it last reported.

    ``epoch`` is the *global step* (hivemind's epoch: one optimizer step of the whole swarm);
    ``dataset_epoch`` the passes over the training set it makes (the unit of milestones).
    """

    state: str = "stopped"  # a wire.states.TrainerState value ("idle" in a host's own swarm record)
    pid: int | None = None
    restarts: int = 0
    since_s: float = 0.0
    retry_in_s: float | None = None  # in backoff or crashloop: when the next attempt starts
    last_error: str | None = None  # why the current attempt failed (cleared when another starts)
    previous_error: str | None = None  # why the one before failed, until the current one trains
    last_exit_code: int | None = None
    step: int | None = None  # local steps since the run started, kept across restarts
    epoch: int | None = None  # the global step
    dataset_epoch: float | None = None
    checkpoint_step: int | None = None
    run_steps: int | None = None  # steps this trainer process took itself
    loss: float | None = None
    samples_per_s: float | None = None
    lr: float | None = None
    samples: int | None = None
    shards_failed: int | None = None
    swarm_peers: int | None = None  # the run's peers this trainer accumulates with, itself included
    resumed_from: str | None = None  # checkpoint | peers | fresh
    trainer_peer_id: str | None = None
    last_warning: str | None = None
    finished: str | None = None  # final.pt of a run that reached [run] max_epochs
    error_lines: list[str] = field(default_factory=list)  # the failing attempt's last lines (operators only)
    error_lines_withheld: bool = False  # error_lines left out: the caller may not read logs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DiscoveryStatus(_Tolerant):
    """``status.discovery``: the store this host announces itself in, and how it answers."""

    url: str = ""
    state: str = "starting"  # starting | ok | degraded
    error: str | None = None
    last_ok_s_ago: float | None = None
    failures: int = 0  # failed store calls in a row (0 once one succeeds)


@dataclass(frozen=True)
class DhtStatus(_Tolerant):
    """``status.dht``: the host's DHT node (a node that died is restarted by the daemon)."""

    alive: bool = True
    restarts: int = 0
    last_death: str | None = None


@dataclass(frozen=True)
class HostStatus:
    """The whole answer of ``GET /v1/status``."""

    version: str = ""
    hostname: str = ""
    peer_id: str = ""
    maddrs: list[str] = field(default_factory=list)
    dht: DhtStatus = field(default_factory=DhtStatus)
    run_id: str | None = None
    paused: bool = False  # the owner asked for a pause (it may still wait for a checkpoint)
    pause: dict[str, Any] | None = None  # until, remaining_s, after_checkpoint (host/state.py pause_status)
    host: dict[str, Any] | None = None  # this host's settings for the run (wire.launch.HostSettings)
    trainer: TrainerStatus = field(default_factory=TrainerStatus)
    discovery: DiscoveryStatus = field(default_factory=DiscoveryStatus)
    peers: int = 0  # fresh peers known through discovery
    state_dir: str = ""
    http: dict[str, str] | None = None  # url, token_file of the loopback listener, when one was asked for

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> HostStatus:
        values = _known(cls, raw)
        values["dht"] = DhtStatus.from_dict(values.get("dht"))
        values["trainer"] = TrainerStatus.from_dict(values.get("trainer"))
        values["discovery"] = DiscoveryStatus.from_dict(values.get("discovery"))
        return cls(**values)
