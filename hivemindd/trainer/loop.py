"""The trainer's life: prepare data and model, join the swarm, resume, train, validate, stop cleanly.

Everything that a restart will not fix (bad data location, unknown model, a
checkpoint of another model) is checked before the DHT starts and raised as
ConfigError. A stop request (SIGTERM/SIGINT) is noticed between steps: the loop
writes a checkpoint, says goodbye to its peers and returns. When the swarm has
trained ``[run] max_epochs`` dataset epochs the loop validates, writes
``final.pt``, emits "finished" and returns; a trainer restarted on a finished run
says "finished" again at once, without joining the swarm.
"""

from __future__ import annotations

import hashlib
import logging
import math
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

from hivemindd.trainer import swarm
from hivemindd.trainer.checkpoint import BEST, FINAL, LoadedCheckpoint, keep_as, load_latest, save_checkpoint
from hivemindd.trainer.data import Batch, ShardTally, check_location, load_classes, resolve_shards, train_batches
from hivemindd.trainer.errors import ConfigError
from hivemindd.trainer.events import EventWriter, ResumeSource
from hivemindd.trainer.folder_tree import is_folder_tree
from hivemindd.trainer.metrics import RunMetrics, stats_dir, write_parameters
from hivemindd.trainer.model import (
    Precision,
    batchnorm_buffers,
    build_model,
    select_device,
    select_precision,
    set_cpu_threads,
)
from hivemindd.trainer.schedule import LrSchedule
from hivemindd.trainer.transforms import DeviceNormalizer
from hivemindd.trainer.validation import Validator
from hivemindd.wire.launch import TrainerLaunch

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


@dataclass
class Session:
    """The live pieces of one trainer process."""

    launch: TrainerLaunch
    events: EventWriter
    precision: Precision
    normalize: DeviceNormalizer
    model: nn.Module
    buffers: swarm.BufferSync
    opt: hivemind.Optimizer
    schedule: LrSchedule
    batches: Iterator[Batch]
    tally: ShardTally
    counters: Counters
    metrics: RunMetrics
    validator: Validator | None
    scaler: hivemind.GradScaler | None = None
    meter: ProgressMeter = field(default_factory=ProgressMeter)
    in_place: bool = False  # gradients accumulate in .grad across local steps; hivemind zeroes them

    def __post_init__(self) -> None:
        self.in_place = swarm.accumulates_in_place(self.opt)

    def dataset_epoch(self) -> float:
        """Passes over the training set by the whole swarm, counting this global epoch's progress so far."""
        spec, opt = self.launch.spec, self.opt
        progress = opt.tracker.global_progress
        partial = progress.samples_accumulated if progress.epoch == opt.local_epoch else 0
        fraction = min(1.0, partial / spec.optimizer.target_batch_size)
        return (opt.local_epoch + fraction) * spec.optimizer.target_batch_size / spec.data.train_samples


def final_epoch(launch: TrainerLaunch) -> int | None:
    """The global (hivemind) epoch at which ``[run] max_epochs`` dataset epochs are done; None: no end."""
    spec = launch.spec
    if spec.run.max_epochs <= 0:
        return None
    return max(1, math.ceil(spec.run.max_epochs * spec.data.train_samples / spec.optimizer.target_batch_size))


def run(launch: TrainerLaunch, events: EventWriter, stop: threading.Event) -> None:
    """Train until ``stop`` is set or the run is over; then checkpoint, leave the swarm and say so."""
    spec = launch.spec
    Path(launch.work_dir).mkdir(parents=True, exist_ok=True)
    device = select_device(launch.host.device)
    precision = select_precision(device)
    classes = load_classes(spec.data.classes) if spec.data.classes else None
    shards = resolve_shards(spec.data.train, "data.train", launch.cache_dir, classes)
    check_location(spec.data.train, shards, "data.train", classes)
    validator = _validator(launch, classes)
    # Every fresh peer of a run starts from the same weights: averaging unrelated random inits (gossip
    # rounds, hivemind's state averaging) would mix networks that have nothing in common.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int.from_bytes(hashlib.sha256(launch.run_id.encode()).digest()[:8], "big"))
        model = build_model(spec.model.arch, spec.model.num_classes, spec.data.image_size, spec.model.pretrained)
    loaded = _load_checkpoint(launch, events)
    if loaded.payload is not None:
        _restore_model(model, loaded, launch)  # before the Optimizer copies the weights
        if loaded.payload.get("finished"):
            _say_finished(launch, events, loaded.payload)
            return
    model.to(device)
    if precision.channels_last:
        model.to(memory_format=torch.channels_last)
    threads = set_cpu_threads(device)
    log.info("trainer: run=%s model=%s device=%s precision=%s threads=%d shards=%d batch_size=%d workers=%d",
             launch.run_id, spec.model.arch, device, precision.describe(), threads, len(shards),
             launch.host.batch_size, launch.host.workers)
    gpu_index = (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else None
    metrics_dir = stats_dir(launch.work_dir)
    write_parameters(metrics_dir, spec.to_dict(), launch.host.to_dict(), launch.run_id,
                     {"device": str(device), "precision": precision.describe(), "torch_threads": threads,
                      "name": torch.cuda.get_device_name(gpu_index) if gpu_index is not None else device.type})
    # Loader workers fork now, before hivemind starts its threads and processes.
    tally = ShardTally()
    batches = train_batches(shards, spec.data.image_size, launch.host.batch_size, launch.host.workers,
                            key="data.train", location=spec.data.train, classes=classes, tally=tally,
                            cache_dir=launch.cache_dir, augment=spec.data.augment)

    if stop.is_set():
        # Asked to stop (a pause, a leave) while starting up: nothing trained, nothing new to save,
        # and no swarm to join and leave again, which would cost the owner many seconds per pause.
        _close(batches)
        step = int(loaded.payload["step"]) if loaded.payload is not None else 0
        log.info("stop requested before joining the swarm; exiting at step %d", step)
        events.stopped(step=step, checkpoint_step=step)
        return
    metrics = RunMetrics(metrics_dir, gpu_index)
    dht = swarm.start_dht(launch)
    opt: hivemind.Optimizer | None = None
    try:
        maddrs = [str(m) for m in dht.get_visible_maddrs()]
        log.info("trainer DHT up: peer_id=%s maddrs=%s", dht.peer_id, maddrs)
        events.started(peer_id=str(dht.peer_id), pid=os.getpid(), maddrs=maddrs)
        buffers = swarm.BufferSync(batchnorm_buffers(model))
        opt = swarm.build_optimizer(launch, dht, model, buffers.tensors)
        scaler = hivemind.GradScaler() if precision.needs_grad_scaler else None
        session = Session(launch, events, precision, DeviceNormalizer(device, precision.channels_last), model,
                          buffers, opt, LrSchedule.from_spec(spec), batches, tally, Counters(), metrics, validator,
                          scaler)
        source = _resume(session, loaded)
        log.info("resumed from %s: step=%d epoch=%d lr=%.6g", source, session.counters.step, opt.local_epoch,
                 swarm.current_lr(opt))
        events.resumed(source=source, step=session.counters.step, epoch=opt.local_epoch)
        if _train(session, stop):
            _finish(session)
        else:
            log.info("stop requested: writing a checkpoint")
            _checkpoint(session)
    finally:
        _close(batches)
        metrics.close()
        _leave_swarm(opt, dht)
    counters = session.counters
    events.stopped(step=counters.step, checkpoint_step=counters.checkpoint_step)
    log.info("stopped at step %d (checkpoint at step %d)", counters.step, counters.checkpoint_step)


def _validator(launch: TrainerLaunch, classes: list[str] | None) -> Validator | None:
    spec = launch.spec
    if not spec.data.val:
        log.info("no data.val in the run spec: no validation, no best.pt")
        return None
    if is_folder_tree(spec.data.val):
        raise ConfigError(f"data.val: {spec.data.val} is a folder tree; validation reads WebDataset shards only "
                          "(pack it with `hmctl dataset pack`)")
    shards = resolve_shards(spec.data.val, "data.val", launch.cache_dir)
    check_location(spec.data.val, shards, "data.val", classes)
    return Validator(shards, spec.data.image_size, launch.host.batch_size, spec.validation.batches,
                     location=spec.data.val, classes=classes)


def _load_checkpoint(launch: TrainerLaunch, events: EventWriter) -> LoadedCheckpoint:
    """The newest whole checkpoint; a damaged latest.pt is reported as a warning (status shows it)."""
    loaded = load_latest(launch.checkpoint_dir)
    damaged = [p for p in loaded.problems if not p.endswith(": missing")]
    if damaged:
        using = f"resuming from {loaded.path.name}" if loaded.path is not None else "no usable checkpoint is left"
        events.warning("checkpoint_corrupt", f"{'; '.join(damaged)}; {using}")
    return loaded


def _say_finished(launch: TrainerLaunch, events: EventWriter, payload: dict[str, Any]) -> None:
    final = launch.checkpoint_dir / FINAL
    log.info("run %s is finished (final checkpoint %s); nothing to train", launch.run_id, final)
    epoch = int(payload["epoch"])
    dataset_epoch = epoch * launch.spec.optimizer.target_batch_size / launch.spec.data.train_samples
    events.finished(step=int(payload["step"]), epoch=epoch, dataset_epoch=dataset_epoch, path=str(final))
    events.stopped(step=int(payload["step"]), checkpoint_step=int(payload["step"]))


def _close(batches: Iterator[Batch]) -> None:
    close = getattr(batches, "close", None)
    if close is not None:
        close()


def _leave_swarm(opt: hivemind.Optimizer | None, dht: hivemind.DHT) -> None:
    """Say goodbye to peers (so they stop counting on us) and stop the DHT; best effort."""
    started = time.monotonic()
    took = []  # each part's share, so a slow leave says which part was slow
    for name, close in (("optimizer", opt.shutdown if opt is not None else None), ("DHT", dht.shutdown)):
        if close is None:
            continue
        began = time.monotonic()
        try:
            close()
        except Exception as exc:  # the checkpoint is safe; a messy goodbye must not turn a stop into a crash
            log.warning("%s shutdown failed: %s", name, exc, exc_info=True)
        took.append(f"{name} {time.monotonic() - began:.1f}s")
    log.info("left the swarm in %.1fs (%s)", time.monotonic() - started, ", ".join(took))


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
        swarm.align_lr(opt, session.schedule)
        return "checkpoint"
    peers = swarm.peers_with_progress(opt)
    if peers == 0:
        # Nobody to ask. Even when asked, hivemind would return at once with nothing.
        return "fresh"
    log.info("no checkpoint; %d peer(s) report progress, loading their state", peers)
    if swarm.load_state_from_peers(opt):
        session.buffers.pull()
        swarm.align_lr(opt, session.schedule)
        return "peers"
    log.warning("no peer shared its state; starting from fresh weights")
    return "fresh"


def _restore_training_state(session: Session, payload: dict[str, Any]) -> None:
    opt = session.opt
    opt.load_state_dict(payload["optimizer"])
    swarm.announce_epoch(opt)
    step = int(payload["step"])
    best = payload.get("best_top1")
    session.counters = Counters(step=step, samples=int(payload["samples"]), checkpoint_step=step,
                                best_top1=float(best) if best is not None else None)
    if payload.get("rng") is not None:
        _set_rng_state(payload["rng"])


def _train(session: Session, stop: threading.Event) -> bool:
    """Train until ``stop`` (False) or the run's last global epoch is done (True)."""
    spec = session.launch.spec
    last_epoch = final_epoch(session.launch)
    counters, opt = session.counters, session.opt
    while not stop.is_set():
        if last_epoch is not None and opt.local_epoch >= last_epoch:
            return True
        images, labels = next(session.batches)
        loss, top1 = _train_step(session, images, labels)
        counters.step += 1
        counters.samples += int(labels.shape[0])
        session.meter.add(loss, int(labels.shape[0]))
        session.metrics.train_step(counters.step, opt.local_epoch, session.dataset_epoch(), loss, top1,
                                   swarm.current_lr(opt), int(labels.shape[0]))
        improved = session.validator is not None and counters.step % spec.validation.every_steps == 0 \
            and _validate(session)
        if improved or counters.step % spec.checkpoint.every_steps == 0:
            _checkpoint(session, best=improved)
        elif session.meter.due():
            _report_progress(session)
    return False


def _train_step(session: Session, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """One local step; (loss, top-1 of the batch)."""
    opt, model, scaler = session.opt, session.model, session.scaler
    images = session.normalize(images)
    labels = labels.to(session.normalize.device, non_blocking=True)
    with session.precision.autocast():
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if opt.tracker.ready_to_update_epoch:
        session.buffers.push()  # this step may average: share the newest statistics
    epoch_before = opt.local_epoch
    if scaler is not None:
        opt.step(grad_scaler=scaler)
        scaler.update()
    else:
        opt.step()  # accumulates; averages with peers and updates weights once per global epoch
    if not session.in_place:
        opt.zero_grad()
    if opt.local_epoch > epoch_before + 1:
        session.buffers.pull()  # hivemind caught up by downloading state from a peer
    if opt.local_epoch != epoch_before:
        swarm.align_lr(opt, session.schedule)
    correct = logits.detach().argmax(dim=1).eq(labels).sum()
    # one device→host sync for both numbers
    loss_value, correct_value = torch.stack([loss.detach().float(), correct.float()]).tolist()
    return loss_value, correct_value / max(1, int(labels.shape[0]))


def _validate(session: Session) -> bool:
    """Score the model on the val set, record it; True if top-1 beat the best so far."""
    assert session.validator is not None
    counters, opt = session.counters, session.opt
    started = time.monotonic()
    scores = session.validator.score(session.model, session.normalize, session.precision)
    improved = counters.best_top1 is None or scores.top1 > counters.best_top1
    if improved:
        counters.best_top1 = scores.top1
    assert counters.best_top1 is not None
    session.metrics.validated(counters.step, opt.local_epoch, scores.loss, scores.top1, scores.top5, scores.samples)
    session.events.validation(step=counters.step, epoch=opt.local_epoch, val_loss=scores.loss, val_top1=scores.top1,
                              val_top5=scores.top5, best_top1=counters.best_top1, samples=scores.samples)
    log.info("validation: step=%d epoch=%d loss=%.4f top1=%.4f top5=%.4f samples=%d best_top1=%.4f (%.1fs)",
             counters.step, opt.local_epoch, scores.loss, scores.top1, scores.top5, scores.samples,
             counters.best_top1, time.monotonic() - started)
    return improved


def _finish(session: Session) -> None:
    """The run is over: validate once more, write latest.pt and final.pt, and say so."""
    counters, opt = session.counters, session.opt
    improved = session.validator is not None and _validate(session)
    if not _checkpoint(session, best=improved, finished=True):
        raise OSError("could not write the final checkpoint (see the warning before); will retry after a restart")
    final = keep_as(session.launch.checkpoint_dir, FINAL)
    dataset_epoch = opt.local_epoch * session.launch.spec.optimizer.target_batch_size / session.launch.spec.data.train_samples
    log.info("run finished: %.2f dataset epochs (global epoch %d) at step %d; final checkpoint %s",
             dataset_epoch, opt.local_epoch, counters.step, final)
    session.events.finished(step=counters.step, epoch=opt.local_epoch, dataset_epoch=dataset_epoch, path=str(final))


def _report_progress(session: Session) -> None:
    loss, rate = session.meter.take()
    counters, opt = session.counters, session.opt
    lr = swarm.current_lr(opt)
    failed = session.tally.failed
    peers = swarm.live_peers(opt)
    session.events.progress(step=counters.step, epoch=opt.local_epoch, loss=loss, samples_per_s=rate, lr=lr,
                            samples=counters.samples, shards_failed=failed, swarm_peers=peers)
    log.info("step=%d epoch=%d loss=%.4f samples/s=%.1f lr=%.4g samples=%d shards_failed=%d swarm_peers=%d",
             counters.step, opt.local_epoch, loss, rate, lr, counters.samples, failed, peers)


def _checkpoint(session: Session, best: bool = False, finished: bool = False) -> bool:
    """Write latest.pt (and best.pt when ``best``); False, with a warning event, if the disk said no.

    A failed write leaves the previous checkpoint whole (checkpoint.py) and training goes on.
    """
    opt, counters = session.opt, session.counters
    payload = {
        "model": session.model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": counters.step,
        "samples": counters.samples,
        "epoch": opt.local_epoch,
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
    log.info("checkpoint: step=%d epoch=%d path=%s%s (%.2fs)", counters.step, opt.local_epoch, path,
             f" and {BEST}" if best else "", time.monotonic() - started)
    session.events.checkpoint(step=counters.step, epoch=opt.local_epoch, path=str(path))
    if session.meter.seen_any:  # nothing to say about loss before the first step
        _report_progress(session)
    return True

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
