"""This host's progress in a run: its tallies, the loss and throughput meter, and the "progress" event."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from hivemindd.trainer.events import EventWriter
from hivemindd.trainer.strategies import Strategy

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 1.0


@dataclass
class Counters:
    """This host's own tallies for the run, carried across restarts by checkpoints."""

    step: int = 0  # local optimizer steps
    samples: int = 0  # samples this host trained on
    checkpoint_step: int = 0  # step of the newest checkpoint on disk
    best_top1: float | None = None  # best val top-1 so far (best.pt holds that model)


@dataclass
class ProgressMeter:
    """Mean loss and throughput since the last progress event."""

    started: float = field(default_factory=time.monotonic)
    loss_sum: float = 0.0
    batches: int = 0
    samples: int = 0
    last_loss: float = float("nan")
    last_rate: float = 0.0
    total_batches: int = 0

    @property
    def seen_any(self) -> bool:
        return self.total_batches > 0

    def add(self, loss: float, samples: int) -> None:
        self.total_batches += 1
        self.loss_sum += loss
        self.batches += 1
        self.samples += samples

    def due(self) -> bool:
        return time.monotonic() - self.started >= PROGRESS_INTERVAL_S

    def take(self) -> tuple[float, float]:
        """(mean loss, samples per second) of the interval, and start a new one."""
        now = time.monotonic()
        if self.batches:  # an empty interval (a report right after another) repeats the last numbers
            self.last_loss = self.loss_sum / self.batches
            self.last_rate = self.samples / max(now - self.started, 1e-9)
        self.started, self.loss_sum, self.batches, self.samples = now, 0.0, 0, 0
        return self.last_loss, self.last_rate


def report_progress(events: EventWriter, strategy: Strategy, counters: Counters, meter: ProgressMeter,
                    shards_failed: int) -> None:
    """Send a "progress" event (and log its line) for the interval ``meter`` has measured."""
    loss, rate = meter.take()
    lr = strategy.current_lr()
    peers = strategy.live_peers()
    epoch = strategy.local_epoch
    events.progress(step=counters.step, epoch=epoch, loss=loss, samples_per_s=rate, lr=lr,
                    samples=counters.samples, shards_failed=shards_failed, swarm_peers=peers)
    log.info("step=%d epoch=%d loss=%.4f samples/s=%.1f lr=%.4g samples=%d shards_failed=%d swarm_peers=%d",
             counters.step, epoch, loss, rate, lr, counters.samples, shards_failed, peers)
