"""Collaborative mode (``[averaging] strategy = "collaborative"``): ``hivemind.Optimizer``.

Every peer accumulates gradients until the swarm together has ``target_batch_size``
samples; then the peers all-reduce their gradients and all take the same large-batch
SGD step (one *global step*, hivemind's epoch). A peer that falls behind downloads the
state of the most advanced one inside ``step``. See docs/hivemind.md ("Optimizer and
schedules") for the hivemind behaviours this wrapper works around.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import hivemind
import torch
from hivemind.optim.grad_averager import GradientAverager
from torch import nn

from hivemindd.trainer.schedule import LrSchedule
from hivemindd.trainer.swarm import hivemind_run_id
from hivemindd.wire.launch import TrainerLaunch

DEFAULT_REQUEST_TIMEOUT_S = 3.0  # hivemind's DecentralizedAverager default


class CollaborativeStrategy:
    """``hivemind.Optimizer`` behind the ``Strategy`` protocol.

    The optimizer accumulates gradients in the model's own ``.grad`` and zeroes them
    after each global step (``reuse_grad_buffers``), so ``step`` never zeroes them.
    """

    def __init__(self, optimizer: Any, schedule: LrSchedule) -> None:
        self._opt = optimizer  # a hivemind.Optimizer (untyped: hivemind ships no type information)
        self._schedule = schedule

    @property
    def local_epoch(self) -> int:
        return int(self._opt.local_epoch)

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        scheduler: torch.optim.lr_scheduler.LRScheduler = self._opt.state_averager.scheduler
        return scheduler

    def current_lr(self) -> float:
        return float(self._opt.opt.param_groups[0]["lr"])

    def progress(self) -> float:
        progress = self._opt.tracker.global_progress
        epoch = self.local_epoch
        partial = progress.samples_accumulated if progress.epoch == epoch else 0
        return epoch + min(1.0, partial / self._opt.target_batch_size)

    def will_average(self) -> bool:
        return bool(self._opt.tracker.ready_to_update_epoch)

    def step(self, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        epoch_before = self.local_epoch
        # accumulates; averages with peers and updates the weights once per global step
        self._opt.step(grad_scaler=grad_scaler)
        if self.local_epoch != epoch_before:
            self.align_lr()

    def align_lr(self) -> None:
        """Make the LR that of the current global epoch, however the epoch was reached.

        hivemind updates the scheduler only inside a global step; after a checkpoint load,
        and after its own catch-up (which sets ``local_epoch`` to the swarm's *after*
        stepping the scheduler), the LR would lag until the next global step.
        """
        epoch = self.local_epoch
        if self.scheduler.last_epoch != epoch or self.current_lr() != self._schedule.lr_at(epoch):
            self._schedule.align(self.scheduler, epoch)

    def announce_epoch(self) -> None:
        """Tell the progress tracker and state sharing about an epoch set from a checkpoint.

        hivemind does the same after its own state downloads; without it the tracker still
        believes in epoch 0 and the first step wastes itself on a pointless resync.
        """
        opt = self._opt
        opt.tracker.report_local_progress(local_epoch=opt.local_epoch, samples_accumulated=0)
        if not opt.client_mode:
            opt.state_averager.state_sharing_priority = opt.local_epoch
            if opt.grad_averager is not None:
                opt.grad_averager.state_sharing_priority = opt.local_epoch

    def peers_with_progress(self) -> int:
        """Other peers' progress records for this run, as read when the Optimizer was built.

        A fresh Optimizer publishes nothing until it has accumulated samples, so this
        counts other peers only (plus, for up to ``metadata_expiration``, a killed
        predecessor of this trainer).
        """
        return int(self._opt.tracker.global_progress.num_peers)

    def live_peers(self) -> int:
        return max(1, int(self._opt.tracker.global_progress.num_peers))

    def load_state_from_peers(self) -> bool:
        """Download from the most advanced peer; success is judged by a change of epoch or weights.

        hivemind returns without a word when no peer shares state (the averagers' key in
        the DHT is empty or lists only dead peers).
        """
        epoch_before, checksum_before = self.local_epoch, self._checksum()
        self._opt.load_state_from_peers()
        loaded = self.local_epoch != epoch_before or self._checksum() != checksum_before
        if loaded:
            self.align_lr()
        return loaded

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = self._opt.state_dict()  # the inner optimizer's state plus local_epoch
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._opt.load_state_dict(state_dict)
        self.align_lr()

    def shutdown(self) -> None:
        self._opt.shutdown()

    @torch.no_grad()
    def _checksum(self) -> float:
        return float(sum(p.detach().double().sum().item() for p in self._opt.state_averager.main_parameters))


def build(launch: TrainerLaunch, dht: hivemind.DHT, model: nn.Module,
          extra_tensors: list[torch.Tensor]) -> CollaborativeStrategy:
    """The run's hivemind.Optimizer; ``model`` must already hold its resumed weights (the Optimizer copies them)."""
    spec = launch.spec
    schedule = LrSchedule.from_spec(spec)
    sgd: Callable[[Any], torch.optim.Optimizer] = lambda params: torch.optim.SGD(  # noqa: E731
        params, lr=schedule.peak_lr, momentum=spec.optimizer.momentum, weight_decay=spec.optimizer.weight_decay)
    # hivemind's matchmaking can deadlock when a leader's answer may take longer than the
    # matchmaking window (its default 3 s request timeout vs. the demo's 2 s window).
    request_timeout = min(DEFAULT_REQUEST_TIMEOUT_S, 0.75 * spec.averaging.matchmaking_time)
    optimizer = hivemind.Optimizer(
        dht=dht,
        run_id=hivemind_run_id(launch.run_id),
        params=model.parameters(),
        optimizer=sgd,
        scheduler=schedule.scheduler,  # stepped by hivemind once per global epoch (see schedule.py)
        target_batch_size=spec.optimizer.target_batch_size,
        batch_size_per_step=launch.host.batch_size,
        matchmaking_time=spec.averaging.matchmaking_time,
        averaging_timeout=spec.averaging.averaging_timeout,
        offload_optimizer=True,
        # Accumulate into the model's own .grad (autograd adds to it in backward) instead of copying
        # every step's gradients into separate accumulators: one pass over all parameters less per
        # step (bench/trainer_overhead.py), and what hivemind.GradScaler (fp16) requires. hivemind
        # zeroes .grad after each global step; CollaborativeStrategy.step must not zero it.
        reuse_grad_buffers=True,
        extra_tensors=extra_tensors,
        # A killed peer's progress record keeps slowing the swarm until it expires.
        tracker_opts={"metadata_expiration": launch.metadata_expiration_s},
        # averager_opts reach only the state averager; the gradient averager needs a factory.
        averager_opts={"request_timeout": request_timeout},
        grad_averager_factory=functools.partial(GradientAverager, request_timeout=request_timeout),
        verbose=True,
    )
    return CollaborativeStrategy(optimizer, schedule)
