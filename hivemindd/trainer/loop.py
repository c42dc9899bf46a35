"""The trainer's life: prepare data and model, join the swarm, resume, train, stop cleanly.

Everything that a restart will not fix (bad data location, unknown model, a
checkpoint of another model) is checked before the DHT starts and raised as
ConfigError. A stop request (SIGTERM/SIGINT) is noticed between steps: the loop
writes a checkpoint, says goodbye to its peers and returns.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hivemind
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hivemindd.launch import TrainerLaunch
from hivemindd.trainer import swarm
from hivemindd.trainer.checkpoint import LoadedCheckpoint, load_latest, save_checkpoint
from hivemindd.trainer.data import Batch, ShardTally, check_location, load_classes, resolve_shards, train_batches
from hivemindd.trainer.errors import ConfigError
from hivemindd.trainer.events import EventWriter, ResumeSource
from hivemindd.trainer.model import batchnorm_buffers, build_model, select_device, set_cpu_threads

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 1.0


@dataclass
class Counters:
    """This host's own tallies for the run, carried across restarts by checkpoints."""

    step: int = 0  # local optimizer steps
    samples: int = 0  # samples this host trained on
    checkpoint_step: int = 0  # step of the newest checkpoint on disk


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


@dataclass
class Session:
    """The live pieces of one trainer process."""

    launch: TrainerLaunch
    events: EventWriter
    device: torch.device
    model: nn.Module
    buffers: swarm.BufferSync
    opt: hivemind.Optimizer
    batches: Iterator[Batch]
    tally: ShardTally
    counters: Counters
    meter: ProgressMeter = field(default_factory=ProgressMeter)


def run(launch: TrainerLaunch, events: EventWriter, stop: threading.Event) -> None:
    """Train until ``stop`` is set; then checkpoint, leave the swarm and emit "stopped"."""
    spec = launch.spec
    Path(launch.work_dir).mkdir(parents=True, exist_ok=True)
    device = select_device(launch.host.device)
    classes = load_classes(spec.data.classes) if spec.data.classes else None
    shards = resolve_shards(spec.data.train, "data.train", launch.cache_dir, classes)
    check_location(spec.data.train, shards, "data.train", classes)
    model = build_model(spec.model.arch, spec.model.num_classes, spec.data.image_size)
    loaded = load_latest(launch.checkpoint_dir)
    if loaded.payload is not None:
        _restore_model(model, loaded, launch)  # before the Optimizer copies the weights
    model.to(device)
    threads = set_cpu_threads(device)
    log.info("trainer: run=%s model=%s device=%s threads=%d shards=%d batch_size=%d workers=%d", launch.run_id,
             spec.model.arch, device, threads, len(shards), launch.host.batch_size, launch.host.workers)
    # Loader workers fork now, before hivemind starts its threads and processes.
    tally = ShardTally()
    batches = train_batches(shards, spec.data.image_size, launch.host.batch_size, launch.host.workers,
                            key="data.train", location=spec.data.train, classes=classes, tally=tally,
                            cache_dir=launch.cache_dir)

    dht = swarm.start_dht(launch)
    opt: hivemind.Optimizer | None = None
    try:
        maddrs = [str(m) for m in dht.get_visible_maddrs()]
        log.info("trainer DHT up: peer_id=%s maddrs=%s", dht.peer_id, maddrs)
        events.started(peer_id=str(dht.peer_id), pid=os.getpid(), maddrs=maddrs)
        buffers = swarm.BufferSync(batchnorm_buffers(model))
        opt = swarm.build_optimizer(launch, dht, model, buffers.tensors)
        session = Session(launch, events, device, model, buffers, opt, batches, tally, Counters())
        source = _resume(session, loaded)
        log.info("resumed from %s: step=%d epoch=%d", source, session.counters.step, opt.local_epoch)
        events.resumed(source=source, step=session.counters.step, epoch=opt.local_epoch)
        _train(session, stop)
        log.info("stop requested: writing a checkpoint")
        _checkpoint(session)
    finally:
        _leave_swarm(opt, dht)
    counters = session.counters
    events.stopped(step=counters.step, checkpoint_step=counters.checkpoint_step)
    log.info("stopped at step %d (checkpoint at step %d)", counters.step, counters.checkpoint_step)


def _leave_swarm(opt: hivemind.Optimizer | None, dht: hivemind.DHT) -> None:
    """Say goodbye to peers (so they stop counting on us) and stop the DHT; best effort."""
    started = time.monotonic()
    for name, close in (("optimizer", opt.shutdown if opt is not None else None), ("DHT", dht.shutdown)):
        if close is None:
            continue
        try:
            close()
        except Exception as exc:  # the checkpoint is safe; a messy goodbye must not turn a stop into a crash
            log.warning("%s shutdown failed: %s", name, exc, exc_info=True)
    log.info("left the swarm in %.1fs", time.monotonic() - started)


def _restore_model(model: nn.Module, loaded: LoadedCheckpoint, launch: TrainerLaunch) -> None:
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


def _resume(session: Session, loaded: LoadedCheckpoint) -> ResumeSource:
    """Checkpoint first; else the swarm's state if anyone has trained; else fresh weights."""
    opt = session.opt
    if loaded.payload is not None:
        _restore_training_state(session, loaded.payload)
        return "checkpoint"
    peers = swarm.peers_with_progress(opt)
    if peers == 0:
        # Nobody to ask. Even when asked, hivemind would return at once with nothing.
        return "fresh"
    log.info("no checkpoint; %d peer(s) report progress, loading their state", peers)
    if swarm.load_state_from_peers(opt):
        session.buffers.pull()
        return "peers"
    log.warning("no peer shared its state; starting from fresh weights")
    return "fresh"


def _restore_training_state(session: Session, payload: dict[str, Any]) -> None:
    opt = session.opt
    opt.load_state_dict(payload["optimizer"])
    scheduler = swarm.scheduler_of(opt)
    if scheduler is not None and payload.get("scheduler") is not None:
        scheduler.load_state_dict(payload["scheduler"])
    swarm.announce_epoch(opt)
    step = int(payload["step"])
    session.counters = Counters(step=step, samples=int(payload["samples"]), checkpoint_step=step)
    if payload.get("rng") is not None:
        _set_rng_state(payload["rng"])


def _train(session: Session, stop: threading.Event) -> None:
    every = session.launch.spec.checkpoint.every_steps
    while not stop.is_set():
        images, labels = next(session.batches)
        loss = _train_step(session, images, labels)
        session.counters.step += 1
        session.counters.samples += int(labels.shape[0])
        session.meter.add(loss, int(labels.shape[0]))
        if session.counters.step % every == 0:
            _checkpoint(session)
        elif session.meter.due():
            _report_progress(session)


def _train_step(session: Session, images: torch.Tensor, labels: torch.Tensor) -> float:
    opt, model = session.opt, session.model
    images = images.to(session.device, non_blocking=True)
    labels = labels.to(session.device, non_blocking=True)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    if opt.tracker.ready_to_update_epoch:
        session.buffers.push()  # this step may average: share the newest statistics
    epoch_before = opt.local_epoch
    opt.step()  # accumulates; averages with peers and updates weights once per global epoch
    opt.zero_grad()
    if opt.local_epoch > epoch_before + 1:
        session.buffers.pull()  # hivemind caught up by downloading state from a peer
    return float(loss.item())


def _report_progress(session: Session) -> None:
    loss, rate = session.meter.take()
    counters, opt = session.counters, session.opt
    lr = swarm.current_lr(opt)
    failed = session.tally.failed
    session.events.progress(step=counters.step, epoch=opt.local_epoch, loss=loss, samples_per_s=rate, lr=lr,
                            samples=counters.samples, shards_failed=failed)
    log.info("step=%d epoch=%d loss=%.4f samples/s=%.1f lr=%.4g samples=%d shards_failed=%d", counters.step,
             opt.local_epoch, loss, rate, lr, counters.samples, failed)


def _checkpoint(session: Session) -> None:
    opt, counters = session.opt, session.counters
    scheduler = swarm.scheduler_of(opt)
    payload = {
        "model": session.model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": counters.step,
        "samples": counters.samples,
        "epoch": opt.local_epoch,
        "rng": _rng_state(),
        "spec_fingerprint": spec_fingerprint(session.launch),
        "run_id": session.launch.run_id,
    }
    started = time.monotonic()
    path = save_checkpoint(session.launch.checkpoint_dir, payload)
    counters.checkpoint_step = counters.step
    log.info("checkpoint: step=%d epoch=%d path=%s (%.2fs)", counters.step, opt.local_epoch, path,
             time.monotonic() - started)
    session.events.checkpoint(step=counters.step, epoch=opt.local_epoch, path=str(path))
    if session.meter.seen_any:  # nothing to say about loss before the first step
        _report_progress(session)


def spec_fingerprint(launch: TrainerLaunch) -> str:
    """Identifies the run recipe a checkpoint was trained under."""
    return hashlib.sha256(launch.spec.to_json().encode()).hexdigest()


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
