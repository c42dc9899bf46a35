"""The swarm view: every live peer of the run and its progress, without a central controller.

Each daemon publishes a small progress record for its host under the run's DHT key
(``hivemindd-swarm:<run_id>``, subkey = its peer id) with an expiration, the way
hivemind's own ``ProgressTracker`` publishes ``<run_id>_progress``; readers take
the whole dictionary and the DHT drops whoever stopped refreshing. The daemon, not
the trainer, publishes: it knows the trainer's numbers (its events and CSV files)
and also what the trainer cannot say about itself — paused, backing off, crash-looping,
or only a DHT node that helps others bootstrap.

Pure stdlib apart from the injected DHT calls: tested with real DHT nodes in
tests/test_swarm_view.py.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import structlog

from hivemindd.wire import states
from hivemindd.wire.spec import RunSpec
from hivemindd.wire.states import TrainerState

log = structlog.get_logger(__name__)

RECORD_VERSION = 1
MAX_RECORDS = 1000  # read per refresh: a run bigger than this shows its first thousand
CLOCK_SKEW_S = 60.0  # how far another host's clock may run ahead and its records still count
# Bounds of what a record may say; past them it is not a record (a forged or broken one).
MAX_TEXT = {"peer_id": 128, "hostname": 253, "state": 32, "trainer_peer_id": 128, "device": 64, "version": 64}
MAX_NUMBER = {"step": 1e15, "epoch": 1e12, "samples_per_s": 1e7, "loss": 1e9, "lr": 1e6, "val_top1": 1.0,
              "val_top5": 1.0, "best_val_top1": 1.0, "restarts": 1e9}

# What a peer is doing, as hmctl peers and the dashboard show it.
TRAINING = "training"
STARTING = "starting"
PAUSED = "paused"
FAILING = "failing"
BOOTSTRAP_ONLY = "bootstrap only"


def swarm_key(run_id: str) -> str:
    """The DHT key of a run's progress records; outside the ``<run_id>_`` names hivemind's validators own."""
    return f"hivemindd-swarm:{run_id}"


def activity(state: str | None, step: int | None) -> str:
    """One word for a peer from its trainer state (a TrainerState value, or 'idle')."""
    if state == TrainerState.PAUSED:
        return PAUSED
    if state in states.FAILING:
        return FAILING
    if state == TrainerState.RUNNING and step is not None:
        return TRAINING
    if state in states.ALIVE:
        return STARTING
    return BOOTSTRAP_ONLY  # idle or stopped: a DHT node that others bootstrap through


@dataclass(frozen=True)
class ProgressRecord:
    """One host's progress in a run, as published to the DHT (versioned, tolerant of unknown fields)."""

    peer_id: str  # the daemon's (host) peer id: the same one discovery shows
    hostname: str
    state: str  # the trainer state on that host
    updated: float  # unix time of publication
    trainer_peer_id: str | None = None
    step: int | None = None
    epoch: int | None = None  # the global step this host is at (hivemind's "epoch"; users read "global step")
    samples_per_s: float | None = None
    loss: float | None = None
    lr: float | None = None
    val_top1: float | None = None
    val_top5: float | None = None
    best_val_top1: float | None = None
    device: str | None = None
    restarts: int = 0
    version: str = ""

    @property
    def activity(self) -> str:
        return activity(self.state, self.step)

    def to_wire(self) -> dict[str, Any]:
        wire = {k: v for k, v in asdict(self).items() if v is not None}
        wire["v"] = RECORD_VERSION
        return wire

    @classmethod
    def from_wire(cls, raw: Any) -> ProgressRecord | None:
        """The record in ``raw``, or None when it is not one (another version's required field missing, bad types)."""
        if not isinstance(raw, dict):
            return None
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, value in raw.items():
            if name in known and value is not None:
                values[name] = value
        try:
            record = cls(**values)
        except TypeError:
            return None
        checks: dict[str, type | tuple[type, ...]] = {
            "peer_id": str, "hostname": str, "state": str, "updated": (int, float), "trainer_peer_id": str,
            "step": int, "epoch": int, "samples_per_s": (int, float), "loss": (int, float), "lr": (int, float),
            "val_top1": (int, float), "val_top5": (int, float), "best_val_top1": (int, float), "device": str,
            "restarts": int, "version": str,
        }
        for name, kind in checks.items():
            value = getattr(record, name)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                return None
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, str) and (len(value) > MAX_TEXT.get(name, 256) or not value.isprintable()):
                return None
            if isinstance(value, int | float) and name in MAX_NUMBER and not 0 <= value <= MAX_NUMBER[name]:
                return None
        return record

    def to_view(self, now: float) -> dict[str, Any]:
        view = asdict(self)
        view["activity"] = self.activity
        view["age_s"] = round(max(0.0, now - self.updated), 1)
        return view


def totals(records: list[ProgressRecord], spec: RunSpec | None) -> dict[str, Any]:
    """Swarm samples/s, global step, dataset epochs done, ETA to the last milestone, best val top-1.

    ``global_epoch`` is the global step (hivemind's epoch: one optimizer step of the whole swarm,
    ``target_batch_size`` samples); ``dataset_epochs`` counts passes over the training set, as milestones do.
    """
    training = [r for r in records if r.activity == TRAINING]
    rate = sum(r.samples_per_s or 0.0 for r in training)
    epochs = [r.epoch for r in records if r.epoch is not None]
    global_epoch = max(epochs) if epochs else None
    best_values = [v for r in records for v in (r.best_val_top1, r.val_top1) if v is not None]
    out: dict[str, Any] = {
        "peers": len(records),
        "training": len(training),
        "samples_per_s": round(rate, 2),
        "global_epoch": global_epoch,
        "global_samples": None,
        "dataset_epochs": None,
        "last_milestone": None,
        "eta_s": None,
        "best_val_top1": max(best_values) if best_values else None,
    }
    if spec is None or global_epoch is None:
        return out
    done = spec.dataset_epochs(global_epoch)
    goal = max(spec.optimizer.milestones) if spec.optimizer.milestones else None
    out.update(global_samples=global_epoch * spec.optimizer.target_batch_size, dataset_epochs=round(done, 4),
               last_milestone=goal)
    if goal is not None and rate > 0:
        out["eta_s"] = round(max(0.0, goal - done) * spec.data.train_samples / rate, 1)
    return out


# Publish this host's value under a key, signed as this host; read every signed value, by signer's peer id.
Store = Callable[[str, dict[str, Any], float], Awaitable[bool]]
Fetch = Callable[[str], Awaitable[dict[str, Any]]]


class SwarmView:
    """Publishes this host's record every ``interval_s`` and keeps the last read of everyone's.

    Owned by the daemon: ``run()`` is one of its tasks. ``snapshot()`` answers from
    memory, so ``hmctl status --swarm`` costs no DHT round trip.
    """

    def __init__(self, store: Store, fetch: Fetch, describe: Callable[[], tuple[str | None, ProgressRecord]],
                 interval_s: float = 5.0, clock: Callable[[], float] = time.time,
                 vouched: Callable[[str], bool] | None = None) -> None:
        self._store = store
        self._fetch = fetch  # values the DHT checked the signature of, by the signer's peer id
        self._vouched = vouched  # peers discovery knows; None: every signed record counts
        self._describe = describe
        self.interval_s = interval_s
        self._clock = clock
        self._records: dict[str, ProgressRecord] = {}
        self._run_id: str | None = None
        self._read_at: float | None = None
        self.error: str | None = None

    @property
    def expiration_s(self) -> float:
        """How long a record lives without a refresh: three missed rounds."""
        return 3 * self.interval_s + 5.0

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval_s)

    async def refresh(self) -> None:
        run_id, own = self._describe()
        if run_id != self._run_id:
            self._records, self._read_at, self._run_id = {}, None, run_id
        if run_id is None:
            return
        key = swarm_key(run_id)
        try:
            await self._store(key, own.to_wire(), own.updated + self.expiration_s)
            found = await self._fetch(key)
        except Exception as exc:  # the DHT is down or slow: keep the last view, say so
            if self.error is None:
                log.warning("swarm.refresh_failed", run_id=run_id, error=str(exc) or type(exc).__name__)
            self.error = str(exc) or type(exc).__name__
            return
        self.error = None
        records = {}
        now = self._clock()
        for signer, raw in list(found.items())[:MAX_RECORDS]:
            record = ProgressRecord.from_wire(raw)
            # Signed by the peer it describes, recent, and a peer discovery vouches for: anyone can
            # write to the DHT, but not in another peer's name, and not into the swarm's totals.
            if (record is None or record.peer_id != signer or not self._fresh(record, now)
                    or (self._vouched is not None and not self._vouched(signer))):
                continue
            records[signer] = record
        if self._run_id == run_id:
            self._records, self._read_at = records, self._clock()

    def _fresh(self, record: ProgressRecord, now: float) -> bool:
        """Published within a record's lifetime, and not from the future (beyond clock skew)."""
        return now - self.expiration_s - CLOCK_SKEW_S <= record.updated <= now + CLOCK_SKEW_S

    def records(self, own: ProgressRecord | None = None) -> list[ProgressRecord]:
        """Everyone's last records, with this host's fresh ``own`` in place of its published one."""
        by_peer = dict(self._records)
        if own is not None:
            by_peer[own.peer_id] = own
        return sorted(by_peer.values(), key=lambda r: (r.hostname, r.peer_id))

    def snapshot(self, run_id: str | None, own: ProgressRecord | None, spec: RunSpec | None) -> dict[str, Any]:
        now = self._clock()
        records = self.records(own) if run_id is not None else []
        return {
            "run_id": run_id,
            "read_age_s": None if self._read_at is None else round(now - self._read_at, 1),
            "error": self.error,
            "peers": [r.to_view(now) for r in records],
            "totals": totals(records, spec),
        }

    def activity_of(self, peer_id: str) -> str | None:
        record = self._records.get(peer_id)
        return record.activity if record is not None else None
