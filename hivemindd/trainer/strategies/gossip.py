"""Gossip mode (``[averaging] strategy = "gossip"``): local SGD plus parameter averaging in small groups.

Every peer steps its own model with plain SGD (the spec's lr, momentum, weight
decay and the run's LR schedule, see ``schedule.py``) and, every ``average_every_steps`` local steps,
starts a round of hivemind's ``DecentralizedAverager``: it finds up to
``group_size`` peers of the run and all-reduces the parameters and BatchNorm
statistics with them. Repeated rounds in changing groups bring every peer to the
swarm's average (hivemind's moshpit averaging). A peer that finds nobody trains
on alone; the round is logged and skipped.

A round runs in the background. Its start copies the live tensors into the
averager's shared CPU buffers (the *snapshot*) and training goes on; when the
round lands a few steps later, each live tensor moves by the group's correction
``p ← p + alpha · (average − snapshot)``. When nothing moved in between this is
exactly ``p ← (1 − alpha) · p + alpha · average``; otherwise the local steps taken
meanwhile are kept on top of the average instead of thrown away.

**What ``local_epoch`` means here.** The schedule's milestones are dataset
epochs converted to "global steps" of ``target_batch_size`` samples
(``RunSpec.milestones_in_global_steps``), as in collaborative mode, where a
global step is ``target_batch_size`` samples trained by the whole swarm. Gossip
keeps the same unit: each peer estimates the samples the *swarm* has trained
(``swarm_samples``) and ``local_epoch = swarm_samples // target_batch_size``.
Each local step adds ``batch_size × peers`` (the number of live peers of the
run, read from the averagers' own DHT records), and each round replaces the
estimate by the group's mean (with the same alpha), which turns "my rate × N"
into the sum of the peers' rates when peers run at different speeds. So an LR
milestone at dataset epoch 30 falls when the swarm as a whole has seen 30
passes over the data, on every peer at about the same time, whatever the number
of peers; counting only this peer's samples would postpone every milestone N-fold
in an N-peer swarm. A lone peer counts exactly its own samples. The epoch never
goes backwards (a round that lowers the estimate only delays the next epoch).

``GossipStrategy`` implements the ``Strategy`` protocol (``strategies/__init__.py``),
through which the trainer loop drives it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Any

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException
from hivemind.averaging.control import StepControl
from hivemind.utils import ValueWithExpiration
from torch import nn

from hivemindd.trainer.errors import ConfigError
from hivemindd.trainer.schedule import LrSchedule
from hivemindd.trainer.swarm import hivemind_run_id
from hivemindd.wire.launch import TrainerLaunch
from hivemindd.wire.spec import RunSpec

log = logging.getLogger(__name__)

Scheduler = torch.optim.lr_scheduler.LRScheduler
DEFAULT_REQUEST_TIMEOUT_S = 3.0  # hivemind's DecentralizedAverager default
PEER_COUNT_REFRESH_S = 10.0
NOBODY = "could not find a group"  # hivemind's message for a round that ended without partners


def averager_prefix(run_id: str) -> str:
    """The DHT prefix of a run's gossip averagers: distinct per run id and from collaborative mode's keys.

    hivemind forbids '.' in prefixes and run ids may hold one; such ids are made safe
    and tagged with a hash so that two ids never share a prefix.
    """
    return f"{hivemind_run_id(run_id)}_gossip"


@torch.no_grad()
def blend_(live: torch.Tensor, averaged: torch.Tensor, snapshot: torch.Tensor, alpha: float) -> None:
    """Move ``live`` by ``alpha`` of the group's correction to ``snapshot``: p ← p + alpha · (avg − snap).

    With ``live == snapshot`` this is p ← (1 − alpha) · p + alpha · avg.
    """
    correction = averaged.to(dtype=torch.float32) - snapshot.to(dtype=torch.float32)
    live.add_(correction.to(device=live.device, dtype=live.dtype), alpha=alpha)


class _StateSharingAverager(DecentralizedAverager):
    """A DecentralizedAverager that serves the optimizer's live state (not its last snapshot) to newcomers."""

    def __init__(self, owner: GossipStrategy, *args: Any, **kwargs: Any) -> None:
        self._owner = owner
        super().__init__(*args, **kwargs)

    def get_current_state(self) -> tuple[Any, Sequence[torch.Tensor], None]:
        metadata, tensors = self._owner.current_state()
        return metadata, tensors, None


class _QuietEmptyRounds(logging.Filter):
    """hivemind logs a traceback at ERROR for each round that found nobody; gossip logs one line of its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else record.msg
        return not (isinstance(error, AllreduceException) and NOBODY in str(error))


def _quiet_empty_rounds() -> None:
    # On the logger itself, before the averager process forks, so that the child has it too.
    logger = logging.getLogger("hivemind.averaging.averager")
    if not any(isinstance(f, _QuietEmptyRounds) for f in logger.filters):
        logger.addFilter(_QuietEmptyRounds())


@dataclass
class _Round:
    control: StepControl
    started: float
    swarm_samples: float  # this peer's estimate when the snapshot was taken


class GossipStrategy:
    """Local SGD whose parameters (and extra tensors) are averaged with groups of peers in the background."""

    def __init__(self, *, dht: hivemind.DHT, prefix: str, params: Sequence[nn.Parameter],
                 extra_tensors: Sequence[torch.Tensor], spec: RunSpec, batch_size: int,
                 peer_record_ttl_s: float = 30.0) -> None:
        self.dht, self.prefix, self.spec = dht, prefix, spec
        self.batch_size = batch_size
        self.every_steps = spec.averaging.average_every_steps
        self.alpha = spec.averaging.alpha
        self.target_batch_size = spec.optimizer.target_batch_size
        self.params = list(params)
        self.schedule = LrSchedule.from_spec(spec)
        self.opt = torch.optim.SGD(self.params, lr=self.schedule.peak_lr, momentum=spec.optimizer.momentum,
                                   weight_decay=spec.optimizer.weight_decay)
        # Put at local_epoch whenever it moves: milestones are in global steps as in collaborative mode.
        self.scheduler: Scheduler = self.schedule.scheduler(self.opt)
        self.local_steps = 0
        self.swarm_samples = 0.0
        self._epoch = 0
        self.rounds_averaged = 0
        self.rounds_skipped = 0
        self.last_group_size = 0
        self._next_round_step = self.every_steps
        self._live = [t for t in self.params] + list(extra_tensors)
        self._snapshot = [t.detach().to("cpu", dtype=torch.float32, copy=True) for t in self._live]
        # The training step and the thread that serves our state to newcomers take turns.
        self._lock = threading.Lock()
        self._round: _Round | None = None
        # hivemind's matchmaking can deadlock when a leader's answer may take longer than
        # the matchmaking window (see collaborative.build).
        self.request_timeout = min(DEFAULT_REQUEST_TIMEOUT_S, 0.75 * spec.averaging.matchmaking_time)
        # Matchmaking itself waits matchmaking_time; give a late partner the leader's answer time on top.
        self.give_up_s = 2 * spec.averaging.matchmaking_time + self.request_timeout
        _quiet_empty_rounds()
        self.averager = _StateSharingAverager(
            self,
            averaged_tensors=[t.clone() for t in self._snapshot],
            dht=dht,
            prefix=prefix,
            target_group_size=spec.averaging.group_size,
            min_group_size=spec.averaging.min_group_size,
            min_matchmaking_time=spec.averaging.matchmaking_time,
            request_timeout=self.request_timeout,
            allreduce_timeout=spec.averaging.averaging_timeout,
            averaging_alpha=1.0,  # the averager yields the plain average; blend_ applies alpha
            declare_state_period=peer_record_ttl_s,  # also how long a dead peer stays counted
            start=True,
        )
        self._peers = 1 + self._count_other_peers(self._read_peer_records())
        self._peers_future: Any = None
        self._peers_read_at = time.monotonic()
        self.announce_epoch()

    # --- the Strategy protocol -----------------------------------------------------------

    @property
    def local_epoch(self) -> int:
        return self._epoch

    def progress(self) -> float:
        partial = max(0, int(self.swarm_samples) - self._epoch * self.target_batch_size)
        return self._epoch + min(1.0, partial / self.target_batch_size)

    def will_average(self) -> bool:
        """True before the step that starts a round: the loop then refreshes the BatchNorm statistics it shares."""
        return self.round_due(self.local_steps + 1)

    def step(self, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """One local SGD step; may land a finished round and start the next one."""
        with self._lock:
            if grad_scaler is None:
                self.opt.step()
            else:
                _scaled_step(grad_scaler, self.opt)
        self.local_steps += 1
        self.swarm_samples += self.batch_size * self._peers
        self._poll_round()
        self._poll_peer_count()
        if self.round_due(self.local_steps):
            self._begin_round()
        self._advance_epoch()
        self.opt.zero_grad(set_to_none=True)

    def round_due(self, step: int) -> bool:
        """A round starts ``average_every_steps`` after the previous one began, or as soon as that one ended."""
        return self._round is None and step >= self._next_round_step

    def state_dict(self) -> dict[str, Any]:
        return {"sgd": self.opt.state_dict(), "local_epoch": self._epoch, "swarm_samples": self.swarm_samples,
                "local_steps": self.local_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "sgd" not in state_dict:
            raise ConfigError("averaging.strategy: the checkpoint's optimizer state was not written in gossip mode "
                              "(no 'sgd' entry); move the run's checkpoints away to start over")
        self.opt.load_state_dict(state_dict["sgd"])
        self.swarm_samples = float(state_dict["swarm_samples"])
        self.local_steps = int(state_dict.get("local_steps", 0))
        self._epoch = int(state_dict["local_epoch"])
        self.schedule.align(self.scheduler, self._epoch)

    def shutdown(self) -> None:
        """Let the round in flight end on its own (bounded by hivemind's deadlines), then stop the averager.

        Groupmates in an all-reduce count on us. A search that is cancelled, or an averager
        stopped mid-search, withdraws its DHT declaration from a process that is about to
        exit, and the DHT process then logs a traceback for a message it cannot read.
        """
        current, self._round = self._round, None
        if current is not None and not current.control.done():
            try:
                current.control.result(timeout=self.give_up_s + self.spec.averaging.averaging_timeout)
            except (CancelledError, asyncio.CancelledError, Exception) as exc:  # leaving anyway
                log.debug("gossip: the last round ended with %s", type(exc).__name__)
        self.averager.shutdown()

    def current_lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    def peers_with_progress(self) -> int:
        """Other live peers of this run (their averagers' DHT records, read at construction)."""
        return self._peers - 1

    def live_peers(self) -> int:
        return self.peers_with_progress() + 1

    def announce_epoch(self) -> None:
        """Offer our state to newcomers with our epoch as priority (the most advanced peer serves first)."""
        if not self.averager.client_mode:
            self.averager.state_sharing_priority = float(self._epoch)

    def load_state_from_peers(self) -> bool:
        """Copy parameters, extra tensors and the sample estimate from the most advanced peer; True on success."""
        # Bounded here as a whole: hivemind's own timeout argument turns into a per-chunk limit of
        # request_timeout (under a second in the demo), too short for a busy peer.
        future = self.averager.load_state_from_peers(wait=False)
        try:
            loaded = future.result(timeout=self.spec.averaging.averaging_timeout)
        except TimeoutError:
            log.warning("gossip: loading state from peers timed out after %.0fs",
                        self.spec.averaging.averaging_timeout)
            return False
        if loaded is None:
            return False
        metadata, tensors = loaded
        shapes = [tuple(t.shape) for t in self._live]
        if not isinstance(metadata, dict) or [tuple(t.shape) for t in tensors] != shapes:
            log.warning("gossip: a peer sent state that does not fit this model; ignoring it")
            return False
        with torch.no_grad(), self._lock:
            for live, remote in zip(self._live, tensors, strict=True):
                live.copy_(remote.to(device=live.device, dtype=live.dtype))
        self.swarm_samples = float(metadata.get("swarm_samples", 0.0))
        self._advance_epoch()
        log.info("gossip: loaded state from a peer at epoch %d (%.0f swarm samples)", self._epoch,
                 self.swarm_samples)
        return True

    def current_state(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """What a newcomer downloads (called by the averager's state-serving thread)."""
        with torch.no_grad(), self._lock:
            tensors = [t.detach().to("cpu", copy=True) for t in self._live]
        return {"swarm_samples": self.swarm_samples, "local_epoch": self._epoch}, tensors

    # --- rounds ---------------------------------------------------------------------------

    def _begin_round(self) -> None:
        with torch.no_grad(), self.averager.get_tensors() as averaged:
            for live, snapshot, shared in zip(self._live, self._snapshot, averaged, strict=True):
                snapshot.copy_(live)
                shared.copy_(snapshot)
        # hivemind's own deadline ends the search: peers learn when we stop looking, and nobody is
        # left waiting on us in a half-formed group, as happens when a search is cancelled.
        control = self.averager.step(gather={"swarm_samples": self.swarm_samples}, wait=False,
                                     timeout=self.give_up_s)
        self._round = _Round(control, time.monotonic(), self.swarm_samples)
        self._next_round_step = self.local_steps + self.every_steps

    def _poll_round(self) -> None:
        current = self._round
        if current is None:
            return
        elapsed = time.monotonic() - current.started
        if not current.control.done():
            if elapsed > self.give_up_s + self.spec.averaging.averaging_timeout + self.request_timeout:
                current.control.cancel()  # hivemind bounds both stages; this is only a guard against a hang
                self._skip(f"still unfinished after {elapsed:.1f}s")
            return
        self._round = None
        try:
            gathered = current.control.result()
        except (CancelledError, asyncio.CancelledError, Exception) as exc:
            if isinstance(exc, AllreduceException) and NOBODY in str(exc):
                self._skip(f"found no group of {self.spec.averaging.min_group_size} in {elapsed:.1f}s")
            else:
                self._skip(f"failed after {elapsed:.1f}s ({type(exc).__name__}: {exc})")
            return
        self._land(current, gathered or {}, elapsed)

    def _skip(self, why: str) -> None:
        self._round = None
        self.rounds_skipped += 1
        log.info("gossip round skipped at step %d: %s; training on alone", self.local_steps, why)

    def _land(self, current: _Round, gathered: dict[Any, Any], elapsed: float) -> None:
        with torch.no_grad(), self.averager.get_tensors() as averaged, self._lock:
            for live, shared, snapshot in zip(self._live, averaged, self._snapshot, strict=True):
                blend_(live, shared, snapshot, self.alpha)
        estimates = [float(g["swarm_samples"]) for g in gathered.values()
                     if isinstance(g, dict) and isinstance(g.get("swarm_samples"), int | float)]
        if estimates:
            group_mean = sum(estimates) / len(estimates)
            self.swarm_samples += self.alpha * (group_mean - current.swarm_samples)
        self.rounds_averaged += 1
        self.last_group_size = len(gathered)
        # The DHT count lags behind newcomers by up to PEER_COUNT_REFRESH_S; a group is proof.
        self._peers = max(self._peers, len(gathered))
        log.info("gossip round averaged at step %d: group of %d, %.1fs, alpha=%g", self.local_steps,
                 len(gathered), elapsed, self.alpha)

    def _advance_epoch(self) -> None:
        epoch = max(self._epoch, math.floor(self.swarm_samples / self.target_batch_size))
        if epoch == self._epoch:
            return
        self._epoch = epoch
        self.schedule.align(self.scheduler, epoch)
        self.announce_epoch()

    # --- counting peers -------------------------------------------------------------------

    def _poll_peer_count(self) -> None:
        """Refresh the live-peer count now and then without blocking a step on the DHT."""
        if self._peers_future is None:
            if time.monotonic() - self._peers_read_at >= PEER_COUNT_REFRESH_S:
                self._peers_future = self.dht.get(self._records_key, latest=True, return_future=True)
            return
        if self._peers_future.done():
            future, self._peers_future = self._peers_future, None
            self._peers_read_at = time.monotonic()
            try:
                self._peers = 1 + self._count_other_peers(future.result())
            except Exception as exc:  # a DHT hiccup: keep the previous count
                log.debug("gossip: could not count peers (%s)", exc)

    @property
    def _records_key(self) -> str:
        # DecentralizedAverager declares itself for state downloads under this key.
        return f"{self.prefix}.all_averagers"

    def _read_peer_records(self) -> Any:
        return self.dht.get(self._records_key, latest=True)

    def _count_other_peers(self, found: Any) -> int:
        if not isinstance(found, ValueWithExpiration) or not isinstance(found.value, dict):
            return 0
        me = self.dht.peer_id.to_bytes()
        return sum(1 for subkey, record in found.value.items()
                   if subkey != me and isinstance(record, ValueWithExpiration)
                   and isinstance(record.value, int | float))


def _scaled_step(scaler: torch.amp.GradScaler, opt: torch.optim.Optimizer) -> None:
    """A plain torch AMP step, also for a ``hivemind.GradScaler``.

    hivemind's scaler defers unscaling and scale updates to hivemind's global steps
    (its ``unscale_`` insists on a hivemind.Optimizer); local SGD steps every time, so
    the base class's methods are called directly.
    """
    base = torch.amp.GradScaler
    base.unscale_(scaler, opt)
    base.step(scaler, opt)
    base.update(scaler)


def build(launch: TrainerLaunch, dht: hivemind.DHT, model: nn.Module,
          extra_tensors: list[torch.Tensor]) -> GossipStrategy:
    """The gossip strategy for ``launch``'s run; ``model`` must already hold its resumed weights."""
    return GossipStrategy(dht=dht, prefix=averager_prefix(launch.run_id), params=list(model.parameters()),
                          extra_tensors=extra_tensors, spec=launch.spec, batch_size=launch.host.batch_size,
                          peer_record_ttl_s=launch.metadata_expiration_s)
