"""The trainer's link to its peers: its own DHT and the hivemind.Optimizer built on it.

See /work/shared/HIVEMIND_NOTES.md for why the trainer runs its own DHT (never the
daemon's p2pd) and why model weights must be loaded before the Optimizer exists.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from typing import Any

import hivemind
import torch
from hivemind.optim.grad_averager import GradientAverager
from torch import nn

from hivemindd.trainer import gossip
from hivemindd.trainer.schedule import LrSchedule
from hivemindd.wire.launch import TrainerLaunch

log = logging.getLogger(__name__)

Scheduler = torch.optim.lr_scheduler.LRScheduler
DEFAULT_REQUEST_TIMEOUT_S = 3.0  # hivemind's DecentralizedAverager default


def start_dht(launch: TrainerLaunch) -> hivemind.DHT:
    """Start this trainer's DHT node, bootstrapped through the host DHT (``launch.initial_peers``)."""
    return hivemind.DHT(
        initial_peers=list(launch.initial_peers),
        host_maddrs=list(launch.host_maddrs),
        announce_maddrs=list(launch.announce_maddrs) or None,
        identity_path=str(launch.identity_path),
        # The supervisor runs one trainer per work dir; the check would cost a throwaway p2pd.
        check_if_identity_free=False,
        start=True,
    )


class BufferSync:
    """BatchNorm statistics as hivemind extra tensors.

    With ``offload_optimizer`` hivemind averages extra tensors in place and insists they
    live on the CPU. On a CPU model the buffers themselves are shared, so averaging and
    downloads land in the model directly. On an accelerator CPU mirrors are shared
    instead: ``push`` copies the model's statistics out before a global step (so peers
    average fresh numbers) and ``pull`` copies downloaded statistics in after a state
    load. Averaged statistics are not pulled back after ordinary rounds; BatchNorm
    statistics are running averages and each peer's own stay close to the swarm's.
    """

    def __init__(self, buffers: list[torch.Tensor]) -> None:
        self._buffers = buffers
        on_cpu = all(b.device.type == "cpu" for b in buffers)
        self._mirrors = None if on_cpu else [b.detach().to("cpu", copy=True) for b in buffers]

    @property
    def tensors(self) -> list[torch.Tensor]:
        return self._buffers if self._mirrors is None else self._mirrors

    @torch.no_grad()
    def push(self) -> None:
        if self._mirrors is not None:
            for mirror, buffer in zip(self._mirrors, self._buffers, strict=True):
                mirror.copy_(buffer)

    @torch.no_grad()
    def pull(self) -> None:
        if self._mirrors is not None:
            for mirror, buffer in zip(self._mirrors, self._buffers, strict=True):
                buffer.copy_(mirror)


def hivemind_run_id(run_id: str) -> str:
    """The run id as hivemind may use it in its DHT prefixes: hivemind forbids '.', which run ids allow.

    An id with a dot is made safe and tagged with a hash, so ``a.b`` and ``a_b`` never share a swarm.
    """
    if "." not in run_id:
        return run_id
    return f"{run_id.replace('.', '_')}_{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"


def build_optimizer(launch: TrainerLaunch, dht: hivemind.DHT, model: nn.Module,
                    extra_tensors: list[torch.Tensor]) -> hivemind.Optimizer | gossip.GossipOptimizer:
    """The run's optimizer (collaborative, or gossip.py's); ``model`` must already hold its resumed weights."""
    spec = launch.spec
    if spec.averaging.strategy == "gossip":
        return gossip.build(launch, dht, model, extra_tensors)
    schedule = LrSchedule.from_spec(spec)
    sgd: Callable[[Any], torch.optim.Optimizer] = lambda params: torch.optim.SGD(  # noqa: E731
        params, lr=schedule.peak_lr, momentum=spec.optimizer.momentum, weight_decay=spec.optimizer.weight_decay)
    # hivemind's matchmaking can deadlock when a leader's answer may take longer than the
    # matchmaking window (its default 3 s request timeout vs. the demo's 2 s window).
    request_timeout = min(DEFAULT_REQUEST_TIMEOUT_S, 0.75 * spec.averaging.matchmaking_time)
    return hivemind.Optimizer(
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
        # zeroes .grad after each global step; the loop must not call zero_grad (accumulates_in_place).
        reuse_grad_buffers=True,
        extra_tensors=extra_tensors,
        # A killed peer's progress record keeps slowing the swarm until it expires.
        tracker_opts={"metadata_expiration": launch.metadata_expiration_s},
        # averager_opts reach only the state averager; the gradient averager needs a factory.
        averager_opts={"request_timeout": request_timeout},
        grad_averager_factory=functools.partial(GradientAverager, request_timeout=request_timeout),
        verbose=True,
    )


def scheduler_of(opt: hivemind.Optimizer) -> Scheduler | None:
    if isinstance(opt, gossip.GossipOptimizer):
        return opt.scheduler
    scheduler = opt.state_averager.scheduler
    return scheduler if isinstance(scheduler, Scheduler) else None


def current_lr(opt: hivemind.Optimizer) -> float:
    if isinstance(opt, gossip.GossipOptimizer):
        return opt.current_lr()
    return float(opt.opt.param_groups[0]["lr"])


def accumulates_in_place(opt: hivemind.Optimizer) -> bool:
    """True when gradients accumulate in the model's .grad across local steps (the loop must not zero them)."""
    grad_averager = getattr(opt, "grad_averager", None)
    return bool(getattr(grad_averager, "reuse_grad_buffers", False))


def align_lr(opt: hivemind.Optimizer, schedule: LrSchedule) -> None:
    """Make the LR that of the current global epoch, however the epoch was reached.

    hivemind updates the scheduler only inside a global step; after a checkpoint load,
    and after its own catch-up (which sets ``local_epoch`` to the swarm's *after*
    stepping the scheduler), the LR would lag until the next global step.
    """
    scheduler = scheduler_of(opt)
    if scheduler is not None and (scheduler.last_epoch != opt.local_epoch
                                  or current_lr(opt) != schedule.lr_at(opt.local_epoch)):
        schedule.align(scheduler, opt.local_epoch)


def announce_epoch(opt: hivemind.Optimizer) -> None:
    """Tell the progress tracker and state sharing about an epoch set from a checkpoint.

    hivemind does the same after its own state downloads; without it the tracker still
    believes in epoch 0 and the first step wastes itself on a pointless resync.
    """
    if isinstance(opt, gossip.GossipOptimizer):
        return opt.announce_epoch()
    opt.tracker.report_local_progress(local_epoch=opt.local_epoch, samples_accumulated=0)
    if not opt.client_mode:
        opt.state_averager.state_sharing_priority = opt.local_epoch
        if opt.grad_averager is not None:
            opt.grad_averager.state_sharing_priority = opt.local_epoch


def peers_with_progress(opt: hivemind.Optimizer) -> int:
    """How many other peers published training progress for this run (read when the Optimizer was built).

    A fresh Optimizer publishes nothing until it has accumulated samples, so this
    counts other peers only (plus, for up to ``metadata_expiration``, a killed
    predecessor of this trainer).
    """
    if isinstance(opt, gossip.GossipOptimizer):
        return opt.peers_with_progress()
    return int(opt.tracker.global_progress.num_peers)


def live_peers(opt: hivemind.Optimizer) -> int:
    """Peers of the run this trainer accumulates with now, itself included (from the DHT's progress records)."""
    if isinstance(opt, gossip.GossipOptimizer):
        return opt.peers_with_progress() + 1
    return max(1, int(opt.tracker.global_progress.num_peers))


def load_state_from_peers(opt: hivemind.Optimizer) -> bool:
    """Download parameters, optimizer state and epoch from the most advanced peer; True if anything arrived.

    hivemind returns without a word when no peer shares state (the averagers' key in
    the DHT is empty or lists only dead peers), so success is judged by a change.
    """
    if isinstance(opt, gossip.GossipOptimizer):
        return opt.load_state_from_peers()
    epoch_before, checksum_before = opt.local_epoch, _checksum(opt)
    opt.load_state_from_peers()
    return opt.local_epoch != epoch_before or _checksum(opt) != checksum_before


@torch.no_grad()
def _checksum(opt: hivemind.Optimizer) -> float:
    return float(sum(p.detach().double().sum().item() for p in opt.state_averager.main_parameters))
