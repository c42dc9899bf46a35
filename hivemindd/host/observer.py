"""What the daemon shows about its run beyond ``status``: the swarm view, metrics history,
Prometheus metrics, predictions and the merged log. Owned by the Daemon (one instance),
which hands it read-only views of its parts; none of this can change what the host does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from hivemindd import __version__
from hivemindd.api.dashboard.history import HistoryCache, RunHistory
from hivemindd.host.logfile import DaemonLogRing, LogLine, TrainerLog, timed
from hivemindd.host.statedir import StatePaths
from hivemindd.host.swarm_view import ProgressRecord, SwarmView
from hivemindd.wire.protocol import HistoryQuery, LogQuery, RequestError
from hivemindd.wire.spec import RunSpec, SpecError, parse_json
from hivemindd.wire.states import IDLE
from hivemindd.wire.status import HostStatus, TrainerStatus

log = structlog.get_logger(__name__)

PREDICT_TIMEOUT_S = 300.0
# Uploads waiting for the one predict subprocess are held in memory (up to MAX_IMAGE_BYTES each): past
# this many, a request is answered 503 at once instead of queueing without bound.
MAX_PREDICT_WAITING = 4


class Observer:
    """Reads the daemon's state; ``describe`` gives (run_id, trainer snapshot) at call time."""

    def __init__(self, paths: StatePaths, hostname: str, peer_id: Callable[[], str],
                 describe: Callable[[], tuple[str | None, TrainerStatus]], swarm: SwarmView,
                 daemon_log: DaemonLogRing | None) -> None:
        self.paths = paths
        self.hostname = hostname
        self._peer_id = peer_id
        self._describe = describe
        self.swarm = swarm
        self.daemon_log = daemon_log
        self._history = HistoryCache()
        self._spec: tuple[str, float, RunSpec | None] | None = None
        self._predicting = asyncio.Semaphore(1)  # one model in memory at a time is plenty for a daemon
        self._predict_waiting = 0  # requests holding an upload until the semaphore is theirs (or running)

    # --- this host's numbers --------------------------------------------------------------

    def run_history(self, run_id: str) -> RunHistory:
        return self._history.get(self.paths.run_dir(run_id) / "stats" / self.hostname)

    def own_record(self) -> tuple[str | None, ProgressRecord]:
        """This host's progress record, fresh: what SwarmView publishes."""
        run_id, trainer = self._describe()
        val: dict[str, Any] = {}
        device = None
        if run_id is not None:
            history = self.run_history(run_id)
            val = history.latest_validation()
            parameters = history.parameters() or {}
            device = (parameters.get("device") or {}).get("device") if isinstance(parameters.get("device"), dict) \
                else None
        record = ProgressRecord(
            peer_id=self._peer_id(), hostname=self.hostname, state=trainer.state or IDLE,
            updated=time.time(), trainer_peer_id=trainer.trainer_peer_id, step=_int(trainer.step),
            epoch=_int(trainer.epoch), samples_per_s=_num(trainer.samples_per_s),
            loss=_num(trainer.loss), lr=_num(trainer.lr), val_top1=_num(val.get("val_top1")),
            val_top5=_num(val.get("val_top5")), best_val_top1=_num(val.get("best_top1")),
            device=device if isinstance(device, str) else None, restarts=int(trainer.restarts or 0),
            version=__version__,
        )
        return run_id, record

    def spec(self, run_id: str) -> RunSpec | None:
        """The run's spec as this host saved it, re-read when spec.json changes; None if unreadable."""
        path = self.paths.run_spec(run_id)
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return None
        if self._spec is None or self._spec[:2] != (run_id, mtime):
            try:
                spec: RunSpec | None = parse_json(path.read_bytes(), source=str(path))
            except (OSError, SpecError):
                spec = None
            self._spec = (run_id, mtime, spec)
        return self._spec[2]

    # --- API answers -----------------------------------------------------------------------

    def swarm_view(self) -> dict[str, Any]:
        run_id, own = self.own_record()
        return self.swarm.snapshot(run_id, own if run_id else None, self.spec(run_id) if run_id else None)

    def history(self, query: HistoryQuery) -> dict[str, Any]:
        current, _ = self._describe()
        run_id = query.run_id or current
        if run_id is None:
            raise RequestError("this host is not in a run; pass run_id to see an earlier run's history",
                               status=409, code="conflict")
        if not self.paths.run_dir(run_id).is_dir():
            raise RequestError(f"no run {run_id!r} on this host", field="run_id", status=404, code="not_found")
        return {"run_id": run_id, "hostname": self.hostname, "now": round(time.time(), 3),
                **self.run_history(run_id).snapshot(query.since, query.cursor)}

    def metrics_snapshot(self, status: HostStatus) -> dict[str, Any]:
        """What ``/metrics`` exports (api/metrics_export.py), from this host's status."""
        run_id = status.run_id
        snap: dict[str, Any] = {
            "run_id": run_id, "version": status.version, "peer_id": status.peer_id,
            "hostname": status.hostname, "trainer": status.trainer.to_dict(), "paused": status.paused,
            "peers": status.peers, "dht_alive": status.dht.alive,
            "discovery_state": status.discovery.state, "discovery_failures": status.discovery.failures,
        }
        if run_id:
            val = self.run_history(run_id).latest_validation()
            snap.update(val_top1=val.get("val_top1"), val_top5=val.get("val_top5"), best_val_top1=val.get("best_top1"))
            with contextlib.suppress(OSError):
                snap["checkpoint_age_s"] = max(0.0, time.time() - (self.paths.run_dir(run_id) / "checkpoints" /
                                                                    "latest.pt").stat().st_mtime)
            view = self.swarm_view()
            snap.update(swarm_peers=len(view["peers"]), swarm_samples_per_s=view["totals"]["samples_per_s"])
        return snap

    def logs(self, query: LogQuery, trainer_log: TrainerLog) -> dict[str, Any]:
        """The trainer's log, the daemon's, or both merged by time; each with its own follow offset."""
        entries: list[tuple[float, str, str]] = []
        answer: dict[str, Any] = {"next": trainer_log.seq, "next_daemon": self.daemon_log.seq if self.daemon_log else 0}
        if query.source in ("trainer", "all"):
            if query.after is None:
                for moment, line in timed(trainer_log.tail(query.n)):
                    entries.append((moment, "trainer", line))
            else:
                items = trainer_log.after_timed(query.after, query.n)
                entries += [(i.time, "trainer", i.line) for i in items]
                answer["next"] = items[-1].seq if items else query.after
        if query.source in ("daemon", "all") and self.daemon_log is not None:
            picked: list[LogLine] = (self.daemon_log.tail(query.n) if query.after_daemon is None
                                     else self.daemon_log.after(query.after_daemon, query.n))
            entries += [(i.time, "daemon", i.line) for i in picked]
            if query.after_daemon is not None:
                answer["next_daemon"] = picked[-1].seq if picked else query.after_daemon
        if query.since is not None:
            entries = [e for e in entries if e[0] >= query.since]
        if query.source == "all":
            entries.sort(key=lambda e: e[0])  # stable: each log keeps its own order for equal times
            entries = entries[-query.n:] if query.after is None and query.after_daemon is None else entries
        answer["lines"] = [line for _, _, line in entries]
        answer["entries"] = [{"time": round(t, 3), "source": source, "line": line} for t, source, line in entries]
        return answer

    async def predict(self, image: bytes, checkpoint: str, top: int) -> dict[str, Any]:
        """Run ``python -m hivemindd.tools.predict`` on one uploaded image; RequestError naming what is wrong."""
        run_id, _ = self._describe()
        if run_id is None:
            raise RequestError("this host is not in a run: there is no checkpoint to predict with", status=409,
                               code="conflict")
        if not image:
            raise RequestError("the request body must be the image file (JPEG, PNG …)", field="body")
        if self._predict_waiting >= MAX_PREDICT_WAITING:
            raise RequestError(f"busy: {self._predict_waiting} predictions are already queued; try again shortly",
                               status=503, code="unavailable")
        tmp_dir = self.paths.root / "tmp"
        tmp_dir.mkdir(mode=0o700, exist_ok=True)
        self._predict_waiting += 1
        try:
            async with self._predicting:
                fd, name = tempfile.mkstemp(prefix="predict-", dir=tmp_dir)
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(image)
                    return await self._run_predict(run_id, Path(name), checkpoint, top)
                finally:
                    Path(name).unlink(missing_ok=True)
        finally:
            self._predict_waiting -= 1

    async def _run_predict(self, run_id: str, image: Path, checkpoint: str, top: int) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hivemindd.tools.predict", "--run-dir", str(self.paths.run_dir(run_id)),
            "--checkpoint", checkpoint, "--top", str(top), str(image),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2")),
        )
        try:
            async with asyncio.timeout(PREDICT_TIMEOUT_S):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RequestError(f"prediction took longer than {PREDICT_TIMEOUT_S:.0f} s", status=503,
                               code="unavailable") from None
        message = err.decode(errors="replace").strip().splitlines()
        if proc.returncode == 2:
            raise RequestError((message[-1] if message else "predict failed").removeprefix("predict: "),
                               field="checkpoint", status=409, code="conflict")
        if proc.returncode != 0:
            log.error("predict.failed", code=proc.returncode, stderr=message[-5:])
            raise RequestError(f"predict exited with {proc.returncode}: {message[-1] if message else ''}", status=503,
                               code="unavailable")
        result: dict[str, Any] = json.loads(out)
        first = result["results"][0]
        if "error" in first:
            raise RequestError(first["error"], field="body", status=400)
        first["image"] = "upload"
        return result


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None
