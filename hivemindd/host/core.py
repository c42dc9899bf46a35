"""The ``Daemon``: everything one host runs, started in order and stopped in reverse.

Parts start in this order and stop in reverse: state-dir lock, desired state,
stale-trainer cleanup, discovery read, host DHT, discovery agent, supervisor,
control API. It also answers the control API (``api.Controller``) and keeps the
trainer in step with the desired state.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import random
import re
import socket
import time
from functools import partial
from typing import Any

import structlog
from aiohttp import web

from hivemindd import __version__
from hivemindd.api.auth import Authorizer, LoopbackSecrets, identity_check_available
from hivemindd.api.connections import (
    IDLE_TIMEOUT_S,
    MAX_CONNECTIONS_PER_UID,
    MAX_TCP_CONNECTIONS,
    ConnectionGate,
    no_caller,
    unix_caller,
)
from hivemindd.api.routes import build_app, peer_guard, token_guard
from hivemindd.discovery import DiscoveryError, PeerRecord, open_backend
from hivemindd.discovery.agent import DiscoveryAgent
from hivemindd.host.config import DaemonConfig
from hivemindd.host.dht import HostDHT, end_stale_dht
from hivemindd.host.logfile import DaemonLogRing, TrainerLog
from hivemindd.host.observer import Observer
from hivemindd.host.process import PidFile, ProcessSpawner
from hivemindd.host.state import (
    DesiredState,
    StateError,
    StatePaths,
    load_or_create_token,
    load_state,
    save_state,
    write_atomic,
)
from hivemindd.host.supervisor import PauseChange, RestartPolicy, Supervisor
from hivemindd.host.swarm_view import TRAINING, SwarmView, activity
from hivemindd.wire.launch import HostSettings, TrainerLaunch, check_device
from hivemindd.wire.protocol import HistoryQuery, JoinRequest, LogQuery, PauseRequest, RequestError
from hivemindd.wire.spec import RunSpec, SpecError, parse_json, parse_toml

log = structlog.get_logger(__name__)

MAX_BOOTSTRAP_PEERS = 4  # other hosts a starting trainer bootstraps from, besides its own host's node
MAX_PEER_MADDRS = 4
DHT_WATCH_S = 5.0
FIRST_ROUND_WAIT_S = 10.0  # how long start-up waits for the store's first answer before READY


class StartupError(RuntimeError):
    """The daemon cannot start; the message says what to do."""


class Daemon:
    """One per host: owns the DHT node, discovery, the supervisor and the control API."""

    def __init__(self, cfg: DaemonConfig, daemon_log: DaemonLogRing | None = None) -> None:
        self.cfg = cfg
        self.daemon_log = daemon_log  # the daemon's own lines, for the API (set up by daemon.configure_logging)
        self.paths = StatePaths(cfg.state_dir)
        self.hostname = socket.gethostname()
        self._stop_event = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._lock_fd: int | None = None
        self._runner: web.AppRunner | None = None
        self._http_runner: web.AppRunner | None = None
        self.http_url: str | None = None
        self.desired = DesiredState()
        self.dht: HostDHT | None = None
        self.agent: DiscoveryAgent | None = None
        self.supervisor: Supervisor | None = None
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
        self._lock_state_dir()
        try:
            self.desired = load_state(self.paths.state_file)
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
        await self.agent.set_run(self.desired.run_id)
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
        dht = self.dht
        agent = self.agent
        swarm = SwarmView(dht.publish, dht.read_signed, lambda: self._observer().own_record(),
                          interval_s=max(1.0, min(5.0, self.cfg.heartbeat_s)), vouched=agent.knows)
        self.observer = Observer(self.paths, self.hostname, lambda: dht.peer_id, self._trainer_view, swarm, self.daemon_log)
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
        await self._serve_api()
        await self._serve_http()
        self._reconcile(user_action=False)
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
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
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

    def _lock_state_dir(self) -> None:
        fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise StartupError(
                f"another hivemindd (pid {holder or '?'}) is using {self.paths.root}; stop it or pass another --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        # Forked children (hivemind's DHT process) must not hold the lock: one orphaned by a
        # SIGKILLed daemon would lock the next daemon out of the state dir it has to clean up.
        os.register_at_fork(after_in_child=self._drop_lock_in_child)

    def _drop_lock_in_child(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None

    async def _serve_api(self) -> None:
        path = self.cfg.socket
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(str(path))
                raise StartupError(f"{path} is in use by another process; pass another --socket")
            except (ConnectionRefusedError, FileNotFoundError):
                path.unlink(missing_ok=True)  # left by a daemon that died
            finally:
                probe.close()
        gate = ConnectionGate(unix_caller, MAX_CONNECTIONS_PER_UID)  # idle or surplus connections cannot starve others
        self._runner = web.AppRunner(build_app(self, peer_guard(Authorizer(self.cfg.operator_group)), gate=gate),
                                     access_log=None, keepalive_timeout=IDLE_TIMEOUT_S)
        await self._runner.setup()
        gate.install(self._runner)
        # With the caller's identity checked per request, anyone may connect (and read status);
        # without it, file permissions are the only guard. Born with its mode: no window either way.
        old_umask = os.umask(0o111 if identity_check_available() else 0o117)
        try:
            await web.UnixSite(self._runner, str(path)).start()
        finally:
            os.umask(old_umask)

    async def _serve_http(self) -> None:
        """The optional TCP listener (dashboard, metrics): same API, bearer token from the state dir."""
        if self.cfg.http is None:
            return
        host, port = self.cfg.http
        loopback = LoopbackSecrets(self.paths.http_token, load_or_create_token(self.paths.http_token))
        gate = ConnectionGate(no_caller, MAX_TCP_CONNECTIONS)
        app = build_app(self, token_guard(loopback), loopback, gate)
        self._http_runner = web.AppRunner(app, access_log=None, keepalive_timeout=IDLE_TIMEOUT_S)
        await self._http_runner.setup()
        gate.install(self._http_runner)
        site = web.TCPSite(self._http_runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"--http {host}:{port}: cannot listen: {exc.strerror or exc}") from None
        bound_port = self._http_runner.addresses[0][1]  # the real one when asked for port 0
        self.http_url = f"http://{'[' + host + ']' if ':' in host else host}:{bound_port}"
        log.info("api.http_listening", url=self.http_url, token_file=str(self.paths.http_token))

    # --- reconciling desired state ---------------------------------------------------------

    def _reconcile(self, user_action: bool) -> None:
        assert self.supervisor is not None
        d = self.desired
        if d.run_id is None:
            self.supervisor.want(None, None, False, user_action)
            return
        key = f"{d.run_id}:{json.dumps(d.host.to_dict(), sort_keys=True)}"
        self.supervisor.want(key, partial(self._launch, d.run_id, d.host), d.paused, user_action,
                             until=d.pause_until, after_checkpoint=d.pause_after_checkpoint)

    def _launch(self, run_id: str, host: HostSettings) -> TrainerLaunch:
        """Built at every (re)start, so a restarted trainer bootstraps from the peers known now."""
        assert self.dht is not None and self.agent is not None
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

    async def _set_desired(self, desired: DesiredState, user_action: bool = True) -> None:
        save_state(self.paths.state_file, desired)
        self.desired = desired
        assert self.agent is not None
        await self.agent.set_run(desired.run_id)
        self._reconcile(user_action)

    # --- the control API (api.Controller) ----------------------------------------------------

    def status(self) -> dict[str, Any]:
        assert self.dht is not None and self.agent is not None and self.supervisor is not None
        trainer = self.supervisor.snapshot()
        trainer["error_lines"] = self.supervisor.error_lines()
        trainer["dataset_epoch"] = self._dataset_epoch(trainer.get("epoch"))
        return {
            "version": __version__,
            "hostname": self.hostname,
            "peer_id": self.dht.peer_id,
            "maddrs": self.dht.maddrs,
            "dht": {"alive": self.dht.alive, "restarts": self.dht.restarts, "last_death": self.dht.last_death},
            "run_id": self.desired.run_id,
            "paused": self.desired.paused,
            "pause": self.desired.pause_status(time.time()),
            "host": self.desired.host.to_dict() if self.desired.run_id else None,
            "trainer": trainer,
            "discovery": self.agent.status(),
            "peers": len(self.agent.peers()),
            "state_dir": str(self.paths.root),
            "http": None if self.http_url is None else {"url": self.http_url, "token_file": str(self.paths.http_token)},
        }

    def _dataset_epoch(self, global_step: Any) -> float | None:
        """Passes over the training set that ``global_step`` swarm-wide optimizer steps make (milestones count these)."""
        if self.desired.run_id is None or not isinstance(global_step, int) or isinstance(global_step, bool):
            return None
        spec = self._observer().spec(self.desired.run_id)
        return None if spec is None else round(spec.dataset_epochs(global_step), 2)

    def peers(self) -> list[dict[str, Any]]:
        """Discovery's fresh peers, each with what it is doing (from its DHT progress record when it has one)."""
        assert self.agent is not None
        found = self.agent.peers()
        swarm = self._observer().swarm
        for peer in found:
            # Without a progress record (not read yet, another run, DHT apart) only the discovery record's
            # trainer state is known: a running trainer there is training, not "starting".
            state = peer.get("state")
            peer["activity"] = swarm.activity_of(peer["peer_id"]) or (TRAINING if state == "running"
                                                                      else activity(state, None))
        return found

    # --- what the dashboard, Prometheus and hmctl status --swarm read (observer.py) ----------

    def _observer(self) -> Observer:
        assert self.observer is not None
        return self.observer

    def _trainer_view(self) -> tuple[str | None, dict[str, Any]]:
        assert self.supervisor is not None
        return self.desired.run_id, self.supervisor.snapshot() if self.desired.run_id else {"state": "idle"}

    def swarm(self) -> dict[str, Any]:
        return self._observer().swarm_view()

    def history(self, query: HistoryQuery) -> dict[str, Any]:
        return self._observer().history(query)

    def metrics(self) -> dict[str, Any]:
        status = self.status()
        return self._observer().metrics_snapshot(status, status["discovery"]["failures"])

    async def predict(self, image: bytes, checkpoint: str, top: int) -> dict[str, Any]:
        return await self._observer().predict(image, checkpoint, top)

    async def join(self, request: JoinRequest) -> dict[str, Any]:
        assert self.agent is not None
        current = self.desired.run_id
        if current is not None and current != request.run_id:
            raise RequestError(f"this host is in run {current!r}; `hmctl leave` first", field="run_id",
                               status=409, code="conflict")
        base = self.desired.host if current == request.run_id else self.cfg.host_defaults
        host = HostSettings(
            device=request.device if request.device is not None else base.device,
            batch_size=request.batch_size if request.batch_size is not None else base.batch_size,
            workers=request.workers if request.workers is not None else base.workers,
        )
        for field, message in host.problems():
            raise RequestError(f"{field} {message}", field=field)
        # Refused now, not 8 s later in status with a retry minutes away; and before a run is created.
        device = await check_device(host.device)
        if device.usable is False:
            raise RequestError(device.message, field="device", status=409, code="device_unavailable")
        if device.usable is None:
            log.warning("run.device_unchecked", device=host.device, reason=device.message)
        spec, created = await self._resolve_spec(request)
        write_atomic(self.paths.run_spec(request.run_id), spec.to_json().encode())
        await self._set_desired(self.desired.joined(request.run_id, host))
        log.info("run.joined", run_id=request.run_id, created=created, host=host.to_dict())
        return {"run_id": request.run_id, "created": created, "host": host.to_dict(), "spec": spec.to_dict()}

    async def _resolve_spec(self, request: JoinRequest) -> tuple[RunSpec, bool]:
        """The run's spec: published now from ``spec_toml``, or fetched from discovery."""
        assert self.agent is not None
        run_id = request.run_id
        try:
            if request.spec_toml is not None:
                try:
                    spec = parse_toml(request.spec_toml, source=request.spec_source)
                except SpecError as exc:
                    raise RequestError(str(exc), field="spec_toml") from None
                created, published = await self.agent.publish_spec(run_id, spec.to_json().encode())
                if not created and _published(published, run_id) != spec:
                    raise RequestError(
                        f"run {run_id!r} already exists with a different spec; join it without --spec, "
                        "or create a new run id", field="spec_toml", status=409, code="conflict")
                return spec, created
            body = await self.agent.fetch_spec(run_id)
        except DiscoveryError as exc:
            raise RequestError(f"discovery store unavailable: {exc}", status=503, code="unavailable") from None
        if body is None:
            raise RequestError(
                f"run {run_id!r} does not exist in {self.cfg.discovery}; create it with "
                f"`hmctl join --run-id {run_id} --spec FILE.toml`", field="run_id", status=404, code="not_found")
        return _published(body, run_id), False

    async def leave(self) -> dict[str, Any]:
        if self.desired.run_id is None:
            raise RequestError("this host is not in a run", status=409, code="conflict")
        run_id = self.desired.run_id
        await self._set_desired(self.desired.left())
        log.info("run.left", run_id=run_id)
        return {"run_id": None, "left": run_id}

    async def pause(self, request: PauseRequest) -> dict[str, Any]:
        until = None if request.duration_s is None else time.time() + request.duration_s
        # Already stopped by a pause: nothing to wait for, whatever the new request says.
        after = request.after_checkpoint and not (self.desired.paused and not self.desired.pause_after_checkpoint)
        return await self._pause(True, until, after)

    async def resume(self) -> dict[str, Any]:
        return await self._pause(False)

    async def _pause(self, paused: bool, until: float | None = None, after_checkpoint: bool = False) -> dict[str, Any]:
        if self.desired.run_id is None:
            raise RequestError("this host is not in a run: nothing to pause or resume", status=409, code="conflict")
        await self._set_desired(self.desired.with_paused(paused, until, after_checkpoint))
        log.info("run.paused" if paused else "run.resumed", run_id=self.desired.run_id, until=until,
                 after_checkpoint=after_checkpoint)
        return {"run_id": self.desired.run_id, "paused": paused, "pause": self.desired.pause_status(time.time())}

    def _pause_changed(self, change: PauseChange) -> None:
        """The supervisor ended a timed pause or let an after-checkpoint pause take effect: persist it."""
        expired = change is PauseChange.EXPIRED
        desired = self.desired.with_paused(False) if expired else self.desired.pause_took_effect()
        self.desired = desired
        try:
            save_state(self.paths.state_file, desired)
        except OSError as exc:  # in memory it holds; a restart would redo the same step
            log.error("state.save_failed", error=str(exc))
        log.info("run.pause_" + change.value, run_id=desired.run_id)
        self._reconcile(user_action=False)

    def logs(self, query: LogQuery) -> dict[str, Any]:
        assert self.trainer_log is not None
        return self._observer().logs(query, self.trainer_log)

    # --- discovery callbacks ----------------------------------------------------------------

    def _describe(self) -> PeerRecord:
        assert self.dht is not None
        state = "idle" if self.supervisor is None or self.desired.run_id is None else self.supervisor.state.value
        return PeerRecord(
            peer_id=self.dht.peer_id, maddrs=tuple(self.dht.maddrs), hostname=self.hostname, version=__version__,
            state=state, run_id=self.desired.run_id, heartbeat=time.time(),
        )

    async def _connect_peers(self, records: list[PeerRecord]) -> list[str]:
        assert self.dht is not None
        answered = await self.dht.connect([(r.peer_id, r.maddrs) for r in records])
        if answered:  # failures are logged by the DHT, once per peer and reason
            log.info("dht.connected_new_peers", asked=len(records), answered=len(answered))
        return answered


def _published(body: bytes, run_id: str) -> RunSpec:
    try:
        return parse_json(body, source=f"runs/{run_id}/spec.json")
    except SpecError as exc:
        raise RequestError(f"the published spec of run {run_id!r} is unusable: {exc}", status=502,
                           code="bad_published_spec") from None
