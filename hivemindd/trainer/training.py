"""The step loop: train, validate and checkpoint every so often, and finish the run at its last global epoch."""

from __future__ import annotations

import logging
import threading
import time

import torch
import torch.nn.functional as F

from hivemindd.trainer import snapshots
from hivemindd.trainer.checkpoint import FINAL, keep_as
from hivemindd.trainer.session import Session, final_epoch

log = logging.getLogger(__name__)


def train(session: Session, stop: threading.Event) -> bool:
    """Train until ``stop`` (False) or the run's last global epoch is done (True)."""
    spec = session.launch.spec
    last_epoch = final_epoch(session.launch)
    counters, strategy = session.counters, session.strategy
    while not stop.is_set():
        if last_epoch is not None and strategy.local_epoch >= last_epoch:
            return True
        images, labels = next(session.batches)
        loss, top1 = _train_step(session, images, labels)
        counters.step += 1
        counters.samples += int(labels.shape[0])
        session.meter.add(loss, int(labels.shape[0]))
        session.metrics.train_step(counters.step, strategy.local_epoch, session.dataset_epoch(), loss, top1,
                                   strategy.current_lr(), int(labels.shape[0]))
        improved = session.validator is not None and counters.step % spec.validation.every_steps == 0 \
            and validate(session)
        if improved or counters.step % spec.checkpoint.every_steps == 0:
            snapshots.save(session, best=improved)
        elif session.meter.due():
            session.report_progress()
    return False


def _train_step(session: Session, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """One local step; (loss, top-1 of the batch)."""
    strategy, model, scaler = session.strategy, session.model, session.scaler
    images = session.normalize(images)
    labels = labels.to(session.normalize.device, non_blocking=True)
    with session.precision.autocast():
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if strategy.will_average():
        session.buffers.push()  # this step may average: share the newest statistics
    epoch_before = strategy.local_epoch
    strategy.step(grad_scaler=scaler)
    if scaler is not None:
        scaler.update()
    if strategy.local_epoch > epoch_before + 1:
        session.buffers.pull()  # the strategy caught up by downloading state from a peer
    correct = logits.detach().argmax(dim=1).eq(labels).sum()
    # one device→host sync for both numbers
    loss_value, correct_value = torch.stack([loss.detach().float(), correct.float()]).tolist()
    return loss_value, correct_value / max(1, int(labels.shape[0]))


def validate(session: Session) -> bool:
    """Score the model on the val set, record it; True if top-1 beat the best so far."""
    assert session.validator is not None
    counters, epoch = session.counters, session.strategy.local_epoch
    started = time.monotonic()
    scores = session.validator.score(session.model, session.normalize, session.precision)
    improved = counters.best_top1 is None or scores.top1 > counters.best_top1
    if improved:
        counters.best_top1 = scores.top1
    assert counters.best_top1 is not None
    session.metrics.validated(counters.step, epoch, scores.loss, scores.top1, scores.top5, scores.samples)
    session.events.validation(step=counters.step, epoch=epoch, val_loss=scores.loss, val_top1=scores.top1,
                              val_top5=scores.top5, best_top1=counters.best_top1, samples=scores.samples)
    log.info("validation: step=%d epoch=%d loss=%.4f top1=%.4f top5=%.4f samples=%d best_top1=%.4f (%.1fs)",
             counters.step, epoch, scores.loss, scores.top1, scores.top5, scores.samples,
             counters.best_top1, time.monotonic() - started)
    return improved


def finish(session: Session) -> None:
    """The run is over: validate once more, write latest.pt and final.pt, and say so."""
    counters, epoch = session.counters, session.strategy.local_epoch
    improved = session.validator is not None and validate(session)
    if not snapshots.save(session, best=improved, finished=True):
        raise OSError("could not write the final checkpoint (see the warning before); will retry after a restart")
    final = keep_as(session.launch.checkpoint_dir, FINAL)
    dataset_epoch = session.launch.spec.dataset_epochs(epoch)
    log.info("run finished: %.2f dataset epochs (global epoch %d) at step %d; final checkpoint %s",
             dataset_epoch, epoch, counters.step, final)
    session.events.finished(step=counters.step, epoch=epoch, dataset_epoch=dataset_epoch, path=str(final))
