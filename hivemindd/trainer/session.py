"""The live pieces of one trainer process, and when its run ends."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from hivemindd.trainer.data import Batch, ShardTally
from hivemindd.trainer.events import EventWriter
from hivemindd.trainer.metrics import RunMetrics
from hivemindd.trainer.model import Precision
from hivemindd.trainer.progress import Counters, ProgressMeter, report_progress
from hivemindd.trainer.strategies import Strategy
from hivemindd.trainer.swarm import BufferSync
from hivemindd.trainer.transforms import DeviceNormalizer
from hivemindd.trainer.validation import Validator
from hivemindd.wire.launch import TrainerLaunch


@dataclass
class Session:
    """The live pieces of one trainer process."""

    launch: TrainerLaunch
    events: EventWriter
    precision: Precision
    normalize: DeviceNormalizer
    model: nn.Module
    buffers: BufferSync
    strategy: Strategy
    batches: Iterator[Batch]
    tally: ShardTally
    counters: Counters
    metrics: RunMetrics
    validator: Validator | None
    scaler: torch.amp.GradScaler | None = None  # a hivemind.GradScaler when the precision needs one
    meter: ProgressMeter = field(default_factory=ProgressMeter)

    def dataset_epoch(self) -> float:
        """Passes over the training set by the whole swarm, counting this global epoch's progress so far."""
        return self.launch.spec.dataset_epochs(self.strategy.progress())

    def report_progress(self) -> None:
        report_progress(self.events, self.strategy, self.counters, self.meter, self.tally.failed)


def final_epoch(launch: TrainerLaunch) -> int | None:
    """The global (hivemind) epoch at which ``[run] max_epochs`` dataset epochs are done; None: no end."""
    spec = launch.spec
    if spec.run.max_epochs <= 0:
        return None
    return max(1, math.ceil(spec.global_steps(spec.run.max_epochs)))
