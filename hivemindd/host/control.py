"""The control API's answers (``api.routes.Controller``): status, peers, join, leave, pause, logs …

Reads come from the daemon's parts as they are now; changes go through the reconciler,
which persists the desired state before acting on it. Refusals are RequestErrors that
say what to do next.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import structlog

from hivemindd import __version__
from hivemindd.discovery import DiscoveryError
from hivemindd.discovery.agent import DiscoveryAgent
from hivemindd.host.config import DaemonConfig
from hivemindd.host.dht import HostDHT
from hivemindd.host.logfile import TrainerLog
from hivemindd.host.observer import Observer
from hivemindd.host.reconciler import Reconciler
from hivemindd.host.state import DesiredState
from hivemindd.host.statedir import StatePaths, write_atomic
from hivemindd.host.supervisor import Supervisor
from hivemindd.host.swarm_view import TRAINING, activity
from hivemindd.wire.launch import HostSettings, check_device
from hivemindd.wire.protocol import HistoryQuery, JoinRequest, LogQuery, PauseRequest, RequestError
from hivemindd.wire.spec import RunSpec, SpecError, parse_json, parse_toml
from hivemindd.wire.status import DhtStatus, DiscoveryStatus, HostStatus

log = structlog.get_logger(__name__)


class HostControl:
    """What the control API asks of this host, answered from its parts."""

    def __init__(self, cfg: DaemonConfig, paths: StatePaths, hostname: str, dht: HostDHT, agent: DiscoveryAgent,
                 supervisor: Supervisor, observer: Observer, trainer_log: TrainerLog, reconciler: Reconciler) -> None:
        self.cfg = cfg
        self.paths = paths
        self.hostname = hostname
        self.dht = dht
        self.agent = agent
        self.supervisor = supervisor
        self.observer = observer
        self.trainer_log = trainer_log
        self.reconciler = reconciler
        self.http_url: str | None = None  # set once the loopback listener is up

    @property
    def desired(self) -> DesiredState:
        return self.reconciler.desired

    def status(self) -> dict[str, Any]:
        return self.snapshot().to_dict()

    def snapshot(self) -> HostStatus:
        """This host as ``GET /v1/status`` reports it."""
        trainer = self.supervisor.snapshot()
        trainer = dataclasses.replace(trainer, error_lines=self.supervisor.error_lines(),
                                      dataset_epoch=self._dataset_epoch(trainer.epoch))
        return HostStatus(
            version=__version__,
            hostname=self.hostname,
            peer_id=self.dht.peer_id,
            maddrs=list(self.dht.maddrs),
            dht=DhtStatus(alive=self.dht.alive, restarts=self.dht.restarts, last_death=self.dht.last_death),
            run_id=self.desired.run_id,
            paused=self.desired.paused,
            pause=self.desired.pause_status(time.time()),
            host=self.desired.host.to_dict() if self.desired.run_id else None,
            trainer=trainer,
            discovery=DiscoveryStatus.from_dict(self.agent.status()),
            peers=len(self.agent.peers()),
            state_dir=str(self.paths.root),
            http=None if self.http_url is None else {"url": self.http_url, "token_file": str(self.paths.http_token)},
        )

    def _dataset_epoch(self, global_step: int | None) -> float | None:
        """Passes over the training set that ``global_step`` swarm-wide optimizer steps make (milestones count these)."""
        if self.desired.run_id is None or not isinstance(global_step, int) or isinstance(global_step, bool):
            return None
        spec = self.observer.spec(self.desired.run_id)
        return None if spec is None else round(spec.dataset_epochs(global_step), 2)

    def peers(self) -> list[dict[str, Any]]:
        """Discovery's fresh peers, each with what it is doing (from its DHT progress record when it has one)."""
        found = self.agent.peers()
        swarm = self.observer.swarm
        for peer in found:
            # Without a progress record (not read yet, another run, DHT apart) only the discovery record's
            # trainer state is known: a running trainer there is training, not "starting".
            state = peer.get("state")
            peer["activity"] = swarm.activity_of(peer["peer_id"]) or (TRAINING if state == "running"
                                                                      else activity(state, None))
        return found

    def swarm(self) -> dict[str, Any]:
        return self.observer.swarm_view()

    def history(self, query: HistoryQuery) -> dict[str, Any]:
        return self.observer.history(query)

    def metrics(self) -> dict[str, Any]:
        return self.observer.metrics_snapshot(self.snapshot())

    async def predict(self, image: bytes, checkpoint: str, top: int) -> dict[str, Any]:
        return await self.observer.predict(image, checkpoint, top)

    async def join(self, request: JoinRequest) -> dict[str, Any]:
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
        await self.reconciler.set(self.desired.joined(request.run_id, host))
        log.info("run.joined", run_id=request.run_id, created=created, host=host.to_dict())
        return {"run_id": request.run_id, "created": created, "host": host.to_dict(), "spec": spec.to_dict()}

    async def _resolve_spec(self, request: JoinRequest) -> tuple[RunSpec, bool]:
        """The run's spec: published now from ``spec_toml``, or fetched from discovery."""
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
        await self.reconciler.set(self.desired.left())
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
        await self.reconciler.set(self.desired.with_paused(paused, until, after_checkpoint))
        log.info("run.paused" if paused else "run.resumed", run_id=self.desired.run_id, until=until,
                 after_checkpoint=after_checkpoint)
        return {"run_id": self.desired.run_id, "paused": paused, "pause": self.desired.pause_status(time.time())}

    def logs(self, query: LogQuery) -> dict[str, Any]:
        return self.observer.logs(query, self.trainer_log)


def _published(body: bytes, run_id: str) -> RunSpec:
    try:
        return parse_json(body, source=f"runs/{run_id}/spec.json")
    except SpecError as exc:
        raise RequestError(f"the published spec of run {run_id!r} is unusable: {exc}", status=502,
                           code="bad_published_spec") from None
