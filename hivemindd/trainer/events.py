"""Events to the daemon: one JSON object per line on an inherited pipe fd.

Each line goes out in one ``os.write`` (short lines are atomic on a pipe), so the
daemon never reads half an event. A daemon that went away must not take the
trainer down: a broken pipe silences the writer and training goes on.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from typing import Any, Literal

from hivemindd.wire.states import TrainerEvent
from hivemindd.wire.states import TrainerEvent as E

log = logging.getLogger(__name__)

ResumeSource = Literal["checkpoint", "peers", "fresh"]


class EventWriter:
    """Writes the trainer's events to ``fd``; with ``fd=None`` events go nowhere (manual runs)."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd
        if fd is not None:
            os.fstat(fd)  # fail early with EBADF rather than on the first event
            # p2pd is exec'ed by hivemind: it must not hold the daemon's pipe open after we die.
            os.set_inheritable(fd, False)

    def started(self, peer_id: str, pid: int, maddrs: list[str]) -> None:
        self.emit(E.STARTED, peer_id=peer_id, pid=pid, maddrs=maddrs)

    def resumed(self, source: ResumeSource, step: int, epoch: int) -> None:
        self.emit(E.RESUMED, source=source, step=step, epoch=epoch)

    def progress(self, step: int, epoch: int, loss: float, samples_per_s: float, lr: float, samples: int,
                 shards_failed: int = 0, swarm_peers: int | None = None) -> None:
        """``shards_failed``: data shards skipped as unreadable since this trainer process started;
        ``swarm_peers``: the run's peers this trainer accumulates with, itself included."""
        # JSON has no NaN: a diverged loss is sent as null rather than breaking strict readers.
        self.emit(E.PROGRESS, step=step, epoch=epoch, loss=loss if math.isfinite(loss) else None,
                  samples_per_s=samples_per_s, lr=lr, samples=samples, shards_failed=shards_failed,
                  swarm_peers=swarm_peers)

    def checkpoint(self, step: int, epoch: int, path: str) -> None:
        self.emit(E.CHECKPOINT, step=step, epoch=epoch, path=path)

    def validation(self, step: int, epoch: int, val_loss: float, val_top1: float, val_top5: float,
                   best_top1: float, samples: int) -> None:
        """Scores of one validation pass (accuracies in 0..1); ``best_top1`` includes this pass."""
        self.emit(E.VALIDATION, step=step, epoch=epoch, val_loss=val_loss if math.isfinite(val_loss) else None,
                  val_top1=val_top1, val_top5=val_top5, best_top1=best_top1, samples=samples)

    def warning(self, kind: str, message: str) -> None:
        """Something the owner should know that training survives (``kind``: checkpoint_corrupt, checkpoint_failed)."""
        self.emit(E.WARNING, kind=kind, message=message)

    def finished(self, step: int, epoch: int, dataset_epoch: float, path: str) -> None:
        """The run reached ``[run] max_epochs``; ``path`` is final.pt. The trainer exits 0 next and must not be restarted."""
        self.emit(E.FINISHED, step=step, epoch=epoch, dataset_epoch=dataset_epoch, path=path)

    def error(self, message: str) -> None:
        self.emit(E.ERROR, message=message)

    def stopped(self, step: int, checkpoint_step: int) -> None:
        self.emit(E.STOPPED, step=step, checkpoint_step=checkpoint_step)

    def emit(self, type_: TrainerEvent, **fields: Any) -> None:
        """Write one event line; never raises because the reader is gone."""
        if self._fd is None:
            return
        data = (json.dumps({"type": type_, **fields}, separators=(",", ":"), allow_nan=False) + "\n").encode()
        try:
            view = memoryview(data)
            while view:  # a line longer than PIPE_BUF may be written in parts
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.EBADF):
                raise
            log.warning("event pipe closed (%s); events are no longer sent", exc.strerror)
            self._fd = None
