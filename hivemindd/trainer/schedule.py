"""The learning rate as a pure function of the global (hivemind) epoch.

hivemind steps a run's scheduler once per global epoch, and after a peer downloads
state from another it steps the scheduler again and again until it reaches the new
epoch. A *chained* scheduler such as ``MultiStepLR`` multiplies the current LR by
gamma at every milestone it passes; but the download has already replaced the
optimizer's param groups, LR included, with the other peer's (already decayed)
ones, so every milestone behind that peer is applied twice: a newcomer at epoch 70
of a 30/60/90 run would train at 0.001 instead of 0.01. ``LambdaLR`` computes
``base_lr × factor(epoch)`` from scratch at every step, so the LR depends on the
epoch alone, whatever path (fresh start, checkpoint, download) led to it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from hivemindd.wire.spec import RunSpec

LINEAR_SCALING_BATCH = 256  # Goyal et al.: lr = base × batch / 256


@dataclass(frozen=True)
class LrSchedule:
    """Peak LR, step decay at global-step milestones, optional linear warmup (all in global steps)."""

    peak_lr: float
    milestones: tuple[int, ...]
    gamma: float
    warmup_steps: int = 0

    @classmethod
    def from_spec(cls, spec: RunSpec) -> LrSchedule:
        opt = spec.optimizer
        peak = opt.lr * opt.target_batch_size / LINEAR_SCALING_BATCH if opt.lr_scaling == "linear" else opt.lr
        return cls(peak_lr=peak, milestones=tuple(spec.milestones_in_global_steps()), gamma=opt.gamma,
                   warmup_steps=round(spec.global_steps(opt.warmup_epochs)))

    def factor(self, epoch: int) -> float:
        """Multiplier of the peak LR during global epoch ``epoch`` (MultiStepLR's milestone semantics)."""
        decay = self.gamma ** bisect.bisect_right(self.milestones, epoch)
        if self.warmup_steps > 0 and epoch < self.warmup_steps:
            # Goyal et al.: ramp linearly; the first epoch already trains at peak/warmup, never at 0.
            return decay * (epoch + 1) / self.warmup_steps
        return decay

    def lr_at(self, epoch: int) -> float:
        return self.peak_lr * self.factor(epoch)

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """A scheduler for hivemind (stepped once per global epoch); its lambda is a plain closure.

        LambdaLR saves callable objects into its state dict and restores them over the
        live one; a closure is not saved, so an old checkpoint cannot override the spec.
        """
        factor = self.factor
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: factor(epoch))

    def align(self, scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int) -> None:
        """Put ``scheduler`` (and its optimizer's LR) exactly at ``epoch``, without stepping through.

        Leaves ``_step_count == epoch + 1``, which is what hivemind's catch-up loop
        (``while scheduler._step_count <= local_epoch: scheduler.step()``) expects.
        """
        scheduler.last_epoch = epoch
        scheduler._step_count = epoch + 1
        lrs = [base * self.factor(epoch) for base in scheduler.base_lrs]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        scheduler._last_lr = lrs
