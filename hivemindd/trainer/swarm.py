"""The trainer's link to its peers: its own DHT, the BatchNorm statistics it shares, the run's DHT name.

The strategies (``strategies/``) build on these. See docs/hivemind.md for why the
trainer runs its own DHT (never the daemon's p2pd) and why model weights must be
loaded before a strategy exists.
"""

from __future__ import annotations

import hashlib

import hivemind
import torch

from hivemindd.wire.launch import TrainerLaunch


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
