"""The ``Daemon``: everything one host runs, started in order and stopped in reverse.

Parts start in this order and stop in reverse: state-dir lock, desired state,
stale-trainer cleanup, host DHT, discovery agent, supervisor and reconciler, control
API. The API's answers live in ``control.py``, the desired state → trainer step in
``reconciler.py``, the sockets in ``listeners.py``.
"""

from __future__ import annotations

import asyncio
import socket
import time

import structlog
from aiohttp import web

from hivemindd import __version__
from hivemindd.discovery import DiscoveryError, PeerRecord, open_backend
from hivemindd.discovery.agent import DiscoveryAgent
from hivemindd.host.config import DaemonConfig
from hivemindd.host.control import HostControl
from hivemindd.host.dht import HostDHT, end_stale_dht
from hivemindd.host.listeners import StartupError, StateDirLock, serve_http, serve_unix
from hivemindd.host.logfile import DaemonLogRing, TrainerLog
from hivemindd.host.observer import Observer
from hivemindd.host.process import PidFile, ProcessSpawner
from hivemindd.host.reconciler import Reconciler
from hivemindd.host.restarts import RestartPolicy
from hivemindd.host.state import DesiredState, load_state
from hivemindd.host.statedir import StateError, StatePaths
from hivemindd.host.supervisor import PauseChange, Supervisor
from hivemindd.host.swarm_view import SwarmView
from hivemindd.wire.states import IDLE
from hivemindd.wire.status import HostStatus, TrainerStatus

log = structlog.get_logger(__name__)

DHT_WATCH_S = 5.0
FIRST_ROUND_WAIT_S = 10.0  # how long start-up waits for the store's first answer before READY

__all__ = ["Daemon", "StartupError"]


class Daemon:
    """One per host: owns the DHT node, discovery, the supervisor and the control API."""

    def __init__(self, cfg: DaemonConfig, daemon_log: DaemonLogRing | None = None) -> None:
        self.cfg = cfg
        self.daemon_log = daemon_log  # the daemon's own lines, for the API (set up by daemon.configure_logging)
        self.paths = StatePaths(cfg.state_dir)
        self.hostname = socket.gethostname()
        self._stop_event = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._lock = StateDirLock(self.paths.lock, self.paths.root)
        self._runner: web.AppRunner | None = None
        self._http_runner: web.AppRunner | None = None
        self._loaded = DesiredState()  # as loaded at start; the reconciler owns it from then on
        self.dht: HostDHT | None = None
        self.agent: DiscoveryAgent | None = None
        self.supervisor: Supervisor | None = None
        self.reconciler: Reconciler | None = None
        self.control: HostControl | None = None
        self.trainer_log: TrainerLog | None = None
        self.observer: Observer | None = None
        self.started = False  # start() ran to its end: only then does stop() announce a stop

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.cfg.http_is_loopback and not self.cfg.http_allow_remote:
            raise StartupError(f"--http {self.cfg.http[0]} is not a loopback address: others could reach the API; "  # type: ignore[index]
                               "use 127.0.0.1:PORT, or pass --http-allow-remote if that is what you want")
        try:
            self.paths.make_root()
        except StateError as exc:
            raise StartupError(str(exc)) from None
        self._lock.acquire()
        try:
            self._loaded = load_state(self.paths.state_file)
        except StateError as exc:
            raise StartupError(str(exc)) from None
        stale = await asyncio.to_thread(PidFile(self.paths.pid_file).end_stale)
        if stale:
            log.warning("trainer.stale_ended", pid=stale)
        dht_record = self.paths.root / "dht.pids"
        await asyncio.to_thread(end_stale_dht, dht_record)  # a SIGKILLed daemon's DHT and p2pd
        if self.cfg.discovery == (self.paths.root / "discovery").as_uri():
            (self.paths.root / "discovery").mkdir(exist_ok=True)  # the embedded default needs no setup
        try:
            backend = open_backend(self.cfg.discovery)
        except DiscoveryError as exc:
            raise StartupError(str(exc)) from None
        self.dht = HostDHT(self.paths.identity, self.cfg.host_maddrs, self.cfg.announce_maddrs, dht_record)
        self.agent = DiscoveryAgent(
            backend, describe=self._describe, on_new_peers=self._connect_peers,
            heartbeat_s=self.cfg.heartbeat_s, ttl_s=self.cfg.ttl_s,
        )
        await self.agent.set_run(self._loaded.run_id)
        # The DHT forks: it must start before signal handlers and the API socket exist. It bootstraps
        # from the operator's --initial-peer alone: records in the store are dialled once it is up
        # (the agent's first heartbeat), so a dead or hostile record can never keep it from starting.
        await asyncio.to_thread(self.dht.start, list(self.cfg.initial_peers))
        self.trainer_log = TrainerLog(self.paths.trainer_log)
        self.supervisor = Supervisor(
            ProcessSpawner(PidFile(self.paths.pid_file)), self.trainer_log, stop_timeout_s=self.cfg.stop_timeout_s,
            hang_timeout_s=self.cfg.hang_timeout_s,
            policy=RestartPolicy(crashloop_cooldown_s=self.cfg.crashloop_cooldown_s),
            on_pause_change=self._pause_changed,
        )
        self.reconciler = Reconciler(self.cfg, self.paths, self._loaded, self.supervisor, self.agent, self.dht)
        dht = self.dht
        agent = self.agent
        swarm = SwarmView(dht.publish, dht.read_signed, lambda: self._observer().own_record(),
                          interval_s=max(1.0, min(5.0, self.cfg.heartbeat_s)), vouched=agent.knows)
        self.observer = Observer(self.paths, self.hostname, lambda: dht.peer_id, self._trainer_view, swarm, self.daemon_log)
        self.control = HostControl(self.cfg, self.paths, self.hostname, self.dht, self.agent, self.supervisor,
                                   self.observer, self.trainer_log, self.reconciler)
        self._tasks = [
            asyncio.create_task(self.agent.run(), name="discovery"),
            asyncio.create_task(self.supervisor.run(), name="supervisor"),
            asyncio.create_task(swarm.run(), name="swarm-view"),
            asyncio.create_task(self._watch_dht(), name="dht-watch"),
        ]
        # READY (and the first status) should say whether the store answered, not "starting": a slow
        # store delays start-up by FIRST_ROUND_WAIT_S at most.
        if not await self.agent.first_round(FIRST_ROUND_WAIT_S):
            log.warning("discovery.first_round_slow", waited_s=FIRST_ROUND_WAIT_S)
        self._runner = await serve_unix(self.cfg.socket, self.control, self.cfg.operator_group)
        if self.cfg.http is not None:
            self._http_runner, self.control.http_url = await serve_http(*self.cfg.http, self.control, self.paths)
        self.reconciler.reconcile(user_action=False)
        log.info("daemon.started", peer_id=self.dht.peer_id, socket=str(self.cfg.socket), run_id=self.desired.run_id,
                 paused=self.desired.paused, discovery=self.cfg.discovery, version=__version__)
        self.started = True

    async def run(self) -> None:
        await self._stop_event.wait()

    def request_stop(self) -> None:
        self._stop_event.set()

    async def stop(self) -> None:
        """Undo whatever start() did, in reverse; quietly when it never finished (the error says why)."""
        if self.started:
            log.info("daemon.stopping")
        if self._http_runner is not None:
            await self._http_runner.cleanup()
        if self._runner is not None:
            await self._runner.cleanup()
            self.cfg.socket.unlink(missing_ok=True)
        if self.supervisor is not None:
            await self.supervisor.shutdown()
        if self.agent is not None:
            await self.agent.withdraw()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.dht is not None:
            await asyncio.to_thread(self.dht.stop)
        if self.trainer_log is not None:
            self.trainer_log.close()
        self._lock.release()
        if self.started:
            log.info("daemon.stopped")
        self.started = False

    async def _watch_dht(self) -> None:
        """Restart the host DHT if its process dies (a crash must not leave the host unreachable for good)."""
        assert self.dht is not None and self.agent is not None
        while True:
            await asyncio.sleep(DHT_WATCH_S)
            try:
                restarted = await asyncio.to_thread(self.dht.restart_if_dead)
            except Exception as exc:  # tried again next round; status says the DHT is down meanwhile
                log.error("dht.restart_failed", error=str(exc))
                continue
            if restarted:
                log.warning("dht.restarted", restarts=self.dht.restarts, maddrs=self.dht.maddrs)
                self.agent.forget_dials()  # the new node knows nobody: dial everyone again

    def status(self) -> HostStatus:
        """The control API's status answer (sd_notify's STATUS line is made from it)."""
        assert self.control is not None
        return self.control.snapshot()

    # --- callbacks of the parts ----------------------------------------------------------------

    @property
    def desired(self) -> DesiredState:
        """What this host should be doing: as loaded at start, then as the reconciler keeps it."""
        return self.reconciler.desired if self.reconciler is not None else self._loaded

    def _observer(self) -> Observer:
        assert self.observer is not None
        return self.observer

    def _trainer_view(self) -> tuple[str | None, TrainerStatus]:
        assert self.supervisor is not None
        run_id = self.desired.run_id
        return run_id, self.supervisor.snapshot() if run_id else TrainerStatus(state=IDLE)

    def _pause_changed(self, change: PauseChange) -> None:
        assert self.reconciler is not None
        self.reconciler.pause_changed(change)

    def _describe(self) -> PeerRecord:
        """This host's discovery record, as of now."""
        assert self.dht is not None
        run_id = self.desired.run_id
        state = "idle" if self.supervisor is None or run_id is None else self.supervisor.state.value
        return PeerRecord(
            peer_id=self.dht.peer_id, maddrs=tuple(self.dht.maddrs), hostname=self.hostname, version=__version__,
            state=state, run_id=run_id, heartbeat=time.time(),
        )

    async def _connect_peers(self, records: list[PeerRecord]) -> list[str]:
        assert self.dht is not None
        answered = await self.dht.connect([(r.peer_id, r.maddrs) for r in records])
        if answered:  # failures are logged by the DHT, once per peer and reason
            log.info("dht.connected_new_peers", asked=len(records), answered=len(answered))
        return answered
