"""What a checkpoint holds of a trainer session, and putting it back.

``checkpoint.py`` makes the files safe (atomic, CRC-checked, a fallback); this module
decides what goes in them: the model's weights, the strategy's state, this host's
counters, the random number generators and a fingerprint of the run spec.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from hivemindd.trainer.checkpoint import BEST, LoadedCheckpoint, keep_as, load_latest, save_checkpoint
from hivemindd.trainer.errors import ConfigError
from hivemindd.trainer.events import EventWriter
from hivemindd.trainer.progress import Counters
from hivemindd.trainer.session import Session
from hivemindd.wire.launch import TrainerLaunch

log = logging.getLogger(__name__)


def spec_fingerprint(launch: TrainerLaunch) -> str:
    """Identifies the run recipe a checkpoint was trained under."""
    return hashlib.sha256(launch.spec.to_json().encode()).hexdigest()


def load_checkpoint(launch: TrainerLaunch, events: EventWriter) -> LoadedCheckpoint:
    """The newest whole checkpoint; a damaged latest.pt is reported as a warning (status shows it)."""
    loaded = load_latest(launch.checkpoint_dir)
    damaged = [p for p in loaded.problems if not p.endswith(": missing")]
    if damaged:
        using = f"resuming from {loaded.path.name}" if loaded.path is not None else "no usable checkpoint is left"
        events.warning("checkpoint_corrupt", f"{'; '.join(damaged)}; {using}")
    return loaded


def restore_model(model: nn.Module, loaded: LoadedCheckpoint, launch: TrainerLaunch) -> None:
    """Load the checkpoint's weights; ConfigError if they belong to another model."""
    assert loaded.payload is not None
    if loaded.payload.get("spec_fingerprint") != spec_fingerprint(launch):
        log.warning("checkpoint %s was written under a different run spec; loading it anyway", loaded.path)
    try:
        model.load_state_dict(loaded.payload["model"])
    except (RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"model.arch: checkpoint {loaded.path} does not fit {launch.spec.model.arch} with "
            f"{launch.spec.model.num_classes} classes ({first}); move {launch.checkpoint_dir} away to start over"
        ) from None


def restore_training_state(session: Session, payload: dict[str, Any]) -> None:
    """The strategy's state (and its epoch, announced to peers), the counters and the RNGs of a checkpoint."""
    strategy = session.strategy
    strategy.load_state_dict(payload["optimizer"])
    strategy.announce_epoch()
    step = int(payload["step"])
    best = payload.get("best_top1")
    session.counters = Counters(step=step, samples=int(payload["samples"]), checkpoint_step=step,
                                best_top1=float(best) if best is not None else None)
    if payload.get("rng") is not None:
        _set_rng_state(payload["rng"])


def save(session: Session, best: bool = False, finished: bool = False) -> bool:
    """Write latest.pt (and best.pt when ``best``); False, with a warning event, if the disk said no.

    A failed write leaves the previous checkpoint whole (checkpoint.py) and training goes on.
    """
    strategy, counters = session.strategy, session.counters
    payload = {
        "model": session.model.state_dict(),
        "optimizer": strategy.state_dict(),
        "step": counters.step,
        "samples": counters.samples,
        "epoch": strategy.local_epoch,
        "best_top1": counters.best_top1,
        "finished": finished,
        "rng": _rng_state(),
        "spec_fingerprint": spec_fingerprint(session.launch),
        "run_id": session.launch.run_id,
    }
    directory = session.launch.checkpoint_dir
    started = time.monotonic()
    try:
        path = save_checkpoint(directory, payload)
        if best:
            keep_as(directory, BEST)
    except OSError as exc:
        message = (f"checkpoint at step {counters.step} failed: {exc.strerror or exc} ({directory}); "
                   f"keeping the one from step {counters.checkpoint_step}, training goes on")
        log.error("%s", message)
        session.events.warning("checkpoint_failed", message)
        return False
    counters.checkpoint_step = counters.step
    log.info("checkpoint: step=%d epoch=%d path=%s%s (%.2fs)", counters.step, strategy.local_epoch, path,
             f" and {BEST}" if best else "", time.monotonic() - started)
    session.events.checkpoint(step=counters.step, epoch=strategy.local_epoch, path=str(path))
    if session.meter.seen_any:  # nothing to say about loss before the first step
        session.report_progress()
    return True


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # as plain values: the checkpoint is loaded with weights_only=True
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    try:
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        log.warning("could not restore random number generator state (%s); continuing with fresh seeds", exc)
