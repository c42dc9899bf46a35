"""The trainer's life: prepare data and model, join the swarm, resume, train, validate, stop cleanly.

Everything that a restart will not fix (bad data location, unknown model, a
checkpoint of another model) is checked before the DHT starts and raised as
ConfigError. A stop request (SIGTERM/SIGINT) is noticed between steps: the loop
writes a checkpoint, says goodbye to its peers and returns. When the swarm has
trained ``[run] max_epochs`` dataset epochs the loop validates, writes
``final.pt``, emits "finished" and returns; a trainer restarted on a finished run
says "finished" again at once, without joining the swarm.

The steps themselves are ``training.py``'s; what a checkpoint holds is ``snapshots.py``'s;
how this peer averages with the others is its strategy's (``strategies/``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hivemind
import torch

from hivemindd.trainer import snapshots, strategies, swarm
from hivemindd.trainer.checkpoint import FINAL, LoadedCheckpoint
from hivemindd.trainer.data import Batch, ShardTally, check_location, load_classes, resolve_shards, train_batches
from hivemindd.trainer.errors import ConfigError
from hivemindd.trainer.events import EventWriter, ResumeSource
from hivemindd.trainer.folder_tree import is_folder_tree
from hivemindd.trainer.metrics import RunMetrics, stats_dir, write_parameters
from hivemindd.trainer.model import batchnorm_buffers, build_model, select_device, select_precision, set_cpu_threads
from hivemindd.trainer.progress import Counters
from hivemindd.trainer.session import Session
from hivemindd.trainer.strategies import Strategy
from hivemindd.trainer.training import finish, train
from hivemindd.trainer.transforms import DeviceNormalizer
from hivemindd.trainer.validation import Validator
from hivemindd.wire.launch import TrainerLaunch

log = logging.getLogger(__name__)


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
    loaded = snapshots.load_checkpoint(launch, events)
    if loaded.payload is not None:
        snapshots.restore_model(model, loaded, launch)  # before the strategy copies the weights
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
    strategy: Strategy | None = None
    try:
        maddrs = [str(m) for m in dht.get_visible_maddrs()]
        log.info("trainer DHT up: peer_id=%s maddrs=%s", dht.peer_id, maddrs)
        events.started(peer_id=str(dht.peer_id), pid=os.getpid(), maddrs=maddrs)
        buffers = swarm.BufferSync(batchnorm_buffers(model))
        strategy = strategies.build(launch, dht, model, buffers.tensors)
        scaler = hivemind.GradScaler() if precision.needs_grad_scaler else None
        session = Session(launch, events, precision, DeviceNormalizer(device, precision.channels_last), model,
                          buffers, strategy, batches, tally, Counters(), metrics, validator, scaler)
        source = _resume(session, loaded)
        log.info("resumed from %s: step=%d epoch=%d lr=%.6g", source, session.counters.step, strategy.local_epoch,
                 strategy.current_lr())
        events.resumed(source=source, step=session.counters.step, epoch=strategy.local_epoch)
        if train(session, stop):
            finish(session)
        else:
            log.info("stop requested: writing a checkpoint")
            snapshots.save(session)
    finally:
        _close(batches)
        metrics.close()
        _leave_swarm(strategy, dht)
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


def _say_finished(launch: TrainerLaunch, events: EventWriter, payload: dict[str, Any]) -> None:
    final = launch.checkpoint_dir / FINAL
    log.info("run %s is finished (final checkpoint %s); nothing to train", launch.run_id, final)
    epoch = int(payload["epoch"])
    dataset_epoch = launch.spec.dataset_epochs(epoch)
    events.finished(step=int(payload["step"]), epoch=epoch, dataset_epoch=dataset_epoch, path=str(final))
    events.stopped(step=int(payload["step"]), checkpoint_step=int(payload["step"]))


def _close(batches: Iterator[Batch]) -> None:
    close = getattr(batches, "close", None)
    if close is not None:
        close()


def _leave_swarm(strategy: Strategy | None, dht: hivemind.DHT) -> None:
    """Say goodbye to peers (so they stop counting on us) and stop the DHT; best effort."""
    started = time.monotonic()
    took = []  # each part's share, so a slow leave says which part was slow
    for name, close in (("optimizer", strategy.shutdown if strategy is not None else None), ("DHT", dht.shutdown)):
        if close is None:
            continue
        began = time.monotonic()
        try:
            close()
        except Exception as exc:  # the checkpoint is safe; a messy goodbye must not turn a stop into a crash
            log.warning("%s shutdown failed: %s", name, exc, exc_info=True)
        took.append(f"{name} {time.monotonic() - began:.1f}s")
    log.info("left the swarm in %.1fs (%s)", time.monotonic() - started, ", ".join(took))


def _resume(session: Session, loaded: LoadedCheckpoint) -> ResumeSource:
    """Checkpoint first; else the swarm's state if anyone has trained; else fresh weights."""
    strategy = session.strategy
    if loaded.payload is not None:
        snapshots.restore_training_state(session, loaded.payload)
        return "checkpoint"
    peers = strategy.peers_with_progress()
    if peers == 0:
        # Nobody to ask. Even when asked, hivemind would return at once with nothing.
        return "fresh"
    log.info("no checkpoint; %d peer(s) report progress, loading their state", peers)
    if strategy.load_state_from_peers():
        session.buffers.pull()
        return "peers"
    log.warning("no peer shared its state; starting from fresh weights")
    return "fresh"
