"""Desired state → actual state: what this host should be doing, persisted before it is done.

``join``, ``leave``, ``pause`` and ``resume`` change the desired state (``state.json``,
written atomically); the reconciler saves it, moves the host's discovery record and
tells the supervisor which trainer to run. On start the daemon reconciles toward what
was saved: after a reboot, a crash or an upgrade the host goes back to what it was doing.
"""

from __future__ import annotations

import json
import random
import re
from functools import partial

import structlog

from hivemindd.discovery.agent import DiscoveryAgent
from hivemindd.host.config import DaemonConfig
from hivemindd.host.dht import HostDHT
from hivemindd.host.state import DesiredState, save_state
from hivemindd.host.statedir import StatePaths
from hivemindd.host.supervisor import PauseChange, Supervisor
from hivemindd.wire.launch import HostSettings, TrainerLaunch
from hivemindd.wire.spec import SpecError, parse_json

log = structlog.get_logger(__name__)

MAX_BOOTSTRAP_PEERS = 4  # other hosts a starting trainer bootstraps from, besides its own host's node
MAX_PEER_MADDRS = 4


class Reconciler:
    """Owns the desired state and keeps the supervisor in step with it."""

    def __init__(self, cfg: DaemonConfig, paths: StatePaths, desired: DesiredState, supervisor: Supervisor,
                 agent: DiscoveryAgent, dht: HostDHT) -> None:
        self.cfg = cfg
        self.paths = paths
        self.desired = desired
        self.supervisor = supervisor
        self.agent = agent
        self.dht = dht

    def reconcile(self, user_action: bool) -> None:
        d = self.desired
        if d.run_id is None:
            self.supervisor.want(None, None, False, user_action)
            return
        key = f"{d.run_id}:{json.dumps(d.host.to_dict(), sort_keys=True)}"
        self.supervisor.want(key, partial(self.launch, d.run_id, d.host), d.paused, user_action,
                             until=d.pause_until, after_checkpoint=d.pause_after_checkpoint)

    def launch(self, run_id: str, host: HostSettings) -> TrainerLaunch:
        """Built at every (re)start, so a restarted trainer bootstraps from the peers known now."""
        try:
            spec = parse_json(self.paths.run_spec(run_id).read_bytes(), source=str(self.paths.run_spec(run_id)))
        except OSError as exc:
            raise SpecError(f"cannot read the run spec: {exc}; `hmctl leave` then join again") from None
        # The host node first (always reachable); then a few peers this host has really reached,
        # never addresses a record merely claims.
        peers = self.agent.reachable_peers()
        random.shuffle(peers)
        initial = self.dht.maddrs + [m for p in peers[:MAX_BOOTSTRAP_PEERS] for m in p["maddrs"][:MAX_PEER_MADDRS]]
        # The trainer runs its own p2pd: same interfaces as the host node, any free port.
        trainer_maddrs = tuple(re.sub(r"/(tcp|udp)/\d+", r"/\1/0", m) for m in self.cfg.host_maddrs)
        return TrainerLaunch(
            run_id=run_id, spec=spec, host=host, work_dir=str(self.paths.run_dir(run_id)),
            cache_dir=str(self.paths.cache), initial_peers=tuple(initial), host_maddrs=trainer_maddrs,
            state_dir=str(self.paths.root), data_roots=self.cfg.data_roots, allow_local_urls=self.cfg.allow_local_urls,
        )

    async def set(self, desired: DesiredState, user_action: bool = True) -> None:
        """Persist ``desired`` first, then act on it (a crash in between redoes the same step)."""
        save_state(self.paths.state_file, desired)
        self.desired = desired
        await self.agent.set_run(desired.run_id)
        self.reconcile(user_action)

    def pause_changed(self, change: PauseChange) -> None:
        """The supervisor ended a timed pause or let an after-checkpoint pause take effect: persist it."""
        expired = change is PauseChange.EXPIRED
        desired = self.desired.with_paused(False) if expired else self.desired.pause_took_effect()
        self.desired = desired
        try:
            save_state(self.paths.state_file, desired)
        except OSError as exc:  # in memory it holds; a restart would redo the same step
            log.error("state.save_failed", error=str(exc))
        log.info("run.pause_" + change.value, run_id=desired.run_id)
        self.reconcile(user_action=False)
