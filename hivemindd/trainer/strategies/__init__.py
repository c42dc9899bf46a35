"""Averaging strategies: how one trainer's optimizer steps meet its peers'.

The trainer loop talks to a ``Strategy`` and to nothing else of hivemind's optimizers;
which one a run uses is its spec's ``[averaging] strategy``, looked up in
``STRATEGIES`` by ``build``, here and nowhere else. Each strategy is one module:

- ``collaborative``: ``hivemind.Optimizer``, large-batch SGD whose gradients are
  all-reduced by the whole swarm once per ``target_batch_size`` samples;
- ``gossip``: local SGD steps, parameters averaged in small groups in the background.

A new strategy is one module implementing the protocol plus one line in
``STRATEGIES`` (and its name among the spec's choices for ``averaging.strategy``);
``tests/test_strategies.py`` runs every registered strategy through the same contract.

Imports: torch, hivemind, the trainer's own schedule, swarm and errors modules, and wire.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import hivemind
import torch
from torch import nn

from hivemindd.trainer.errors import ConfigError
from hivemindd.trainer.strategies import collaborative, gossip
from hivemindd.wire.launch import TrainerLaunch


class Strategy(Protocol):
    """What the trainer loop needs of a strategy.

    The unit of progress is the *global step* (hivemind calls it the epoch): one per
    ``target_batch_size`` samples trained by the whole swarm. The LR schedule, the
    milestones and ``[run] max_epochs`` are all counted in it.
    """

    @property
    def local_epoch(self) -> int:
        """The global step this peer is at; it never goes backwards while training."""
        ...

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        """The LR scheduler, kept at ``local_epoch`` (the LR is a function of the global step alone)."""
        ...

    def current_lr(self) -> float:
        """The learning rate the next step uses."""
        ...

    def progress(self) -> float:
        """Global steps made so far, fractional: ``local_epoch`` plus the share of the next one accumulated."""
        ...

    def will_average(self) -> bool:
        """True when the next step may share tensors with peers (the loop refreshes what it shares first)."""
        ...

    def step(self, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """One local step from the gradients in the model's ``.grad``; leaves ``.grad`` ready for the next backward.

        May average with peers, move ``local_epoch`` (the LR follows it), or download a
        more advanced peer's state (then ``local_epoch`` jumps by more than one).
        """
        ...

    def announce_epoch(self) -> None:
        """Tell peers about an epoch restored from a checkpoint (progress records, state-sharing priority)."""
        ...

    def peers_with_progress(self) -> int:
        """Other peers of the run that published training progress (read when the strategy was built)."""
        ...

    def live_peers(self) -> int:
        """Peers of the run this trainer trains with now, itself included."""
        ...

    def load_state_from_peers(self) -> bool:
        """Take parameters, optimizer state and epoch from the most advanced peer; True if anything arrived."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the strategy (optimizer state and epoch; never the model's weights)."""
        ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output; ConfigError if another strategy wrote it."""
        ...

    def shutdown(self) -> None:
        """Leave the swarm: let a round in flight end (bounded by the spec's timeouts), stop averaging."""
        ...


# (launch, the trainer's DHT, the model holding its resumed weights, extra tensors averaged with the
# parameters: BatchNorm statistics on the CPU) -> the strategy.
StrategyFactory = Callable[[TrainerLaunch, hivemind.DHT, nn.Module, list[torch.Tensor]], Strategy]

STRATEGIES: dict[str, StrategyFactory] = {
    "collaborative": collaborative.build,
    "gossip": gossip.build,
}


def build(launch: TrainerLaunch, dht: hivemind.DHT, model: nn.Module, extra_tensors: list[torch.Tensor]) -> Strategy:
    """The strategy the launch's spec names; ``model`` must already hold its resumed weights."""
    name = launch.spec.averaging.strategy
    factory = STRATEGIES.get(name)
    if factory is None:
        raise ConfigError(f"averaging.strategy: {name!r} is not a strategy this trainer has "
                          f"({', '.join(sorted(STRATEGIES))})")
    return factory(launch, dht, model, extra_tensors)
