"""The trainer's life as every side names it: its states, its exit codes, the events it sends.

The supervisor (host/supervisor.py) moves a trainer between these states and writes
them into status; sd_notify, Prometheus, the swarm view and hmctl read them back;
the trainer exits with these codes and emits these events (trainer/events.py). Written
once here so no side spells them again. Standard library only.
"""

from __future__ import annotations

import enum


class TrainerState(enum.StrEnum):
    """Where the supervisor has a host's trainer (``status.trainer.state``)."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    BACKOFF = "backoff"
    CRASHLOOP = "crashloop"
    PAUSED = "paused"


IDLE = "idle"  # what a host not in a run reports instead of a trainer state (its discovery record, its swarm record)

# A trainer process exists (it may not train yet).
ALIVE = frozenset({TrainerState.STARTING, TrainerState.RUNNING, TrainerState.STOPPING})
# The trainer died and the supervisor waits before it tries again.
FAILING = frozenset({TrainerState.BACKOFF, TrainerState.CRASHLOOP})


class TrainerExit(enum.IntEnum):
    """How ``python -m hivemindd.trainer`` ends; the supervisor decides what to do next from it."""

    OK = 0  # stopped when asked (SIGTERM), or the run finished: not a failure
    CRASH = 1  # anything else: restarted with backoff
    CONFIG = 2  # the spec, the launch file or the data is wrong: restarting will not help (crashloop at once)


class TrainerEvent(enum.StrEnum):
    """The ``type`` of each JSON line a trainer writes to the daemon (fields: trainer/events.py)."""

    STARTED = "started"  # peer_id, pid, maddrs
    RESUMED = "resumed"  # source (checkpoint | peers | fresh), step, epoch
    PROGRESS = "progress"  # step, epoch, loss, samples_per_s, lr, samples, shards_failed, swarm_peers
    CHECKPOINT = "checkpoint"  # step, epoch, path
    VALIDATION = "validation"  # step, epoch, val_loss, val_top1, val_top5, best_top1, samples
    WARNING = "warning"  # kind, message: something training survives
    FINISHED = "finished"  # step, epoch, dataset_epoch, path: [run] max_epochs reached, exits 0 next
    ERROR = "error"  # message: why it is about to exit
    STOPPED = "stopped"  # step, checkpoint_step: the last line of a clean stop
