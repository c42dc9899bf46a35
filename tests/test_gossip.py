"""Gossip mode: peers that average in groups get closer, alpha moves them part way, a lone peer trains on.

Peers are real processes on loopback, joined through a bootstrap DHT that stands in
for the host DHT. The multi-peer tests drive ``GossipStrategy`` (built through
``strategies.build``, as the trainer does) on a tiny model, so that the test can
compare the peers' weights; the lone-peer test runs the real trainer process.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from hivemindd.trainer.strategies import gossip
from tests.test_trainer_process import Trainer, make_launch

PEER = textwrap.dedent("""
    import json, logging, os, sys, threading
    import torch
    from torch import nn
    from hivemindd.wire.launch import HostSettings, TrainerLaunch
    from hivemindd.wire.spec import RunSpec
    from hivemindd.trainer import strategies, swarm
    from hivemindd.trainer.model import batchnorm_buffers

    name, out, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    spec = RunSpec.from_dict({
        "data": {"train": "demo://shapes/train", "train_samples": 6400},
        "optimizer": {"target_batch_size": 64, "lr": config["lr"], "momentum": 0.0, "weight_decay": 0.0},
        "averaging": {"strategy": "gossip", "alpha": config["alpha"], "average_every_steps": 5,
                      "matchmaking_time": 1.0, "averaging_timeout": 10.0},
    })
    launch = TrainerLaunch(run_id=config["run_id"], spec=spec, host=HostSettings(batch_size=8),
                           work_dir=f"{out}/{name}", cache_dir=out, initial_peers=tuple(config["peers"]),
                           metadata_expiration_s=10.0)
    os.makedirs(launch.work_dir)
    dht = swarm.start_dht(launch)
    torch.manual_seed(config["seed"])  # a different random init on every peer
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    opt = strategies.build(launch, dht, model, batchnorm_buffers(model))
    weights = lambda: torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    torch.save(weights(), f"{out}/{name}-init.pt")
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    print("READY", flush=True)
    data = torch.Generator().manual_seed(1)
    teacher = torch.randn(16, 4, generator=data)  # the same task on every peer
    averaged = skipped = 0
    loss = torch.tensor(float("nan"))
    while not stop.is_set():
        x = torch.randn(8, 16, generator=data)
        loss = nn.functional.cross_entropy(model(x), (x @ teacher).argmax(1))
        loss.backward()
        opt.step()  # also zeroes the gradients
        if (opt.rounds_averaged, opt.rounds_skipped) != (averaged, skipped):
            if opt.rounds_averaged == 1 and averaged == 0:
                torch.save(weights(), f"{out}/{name}-first.pt")
            averaged, skipped = opt.rounds_averaged, opt.rounds_skipped
            print("ROUND " + json.dumps({"averaged": averaged, "skipped": skipped, "group": opt.last_group_size}),
                  flush=True)
        stop.wait(config["step_s"])  # pace the steps like a real model's instead of spinning a core
    torch.save(weights(), f"{out}/{name}-final.pt")
    print("DONE " + json.dumps({"steps": opt.local_steps, "epoch": opt.local_epoch, "lr": opt.current_lr(),
                                "averaged": opt.rounds_averaged, "loss": float(loss)}), flush=True)
    opt.shutdown()
    dht.shutdown()
""")



Line = tuple["Peer", str | None]


class Peer:
    """One driver process; its stdout lines arrive on the ``inbox`` it shares with the other peers."""

    def __init__(self, name: str, out: Path, config: dict[str, Any], groups: list[int],
                 inbox: queue.Queue[Line]) -> None:
        self.name, self.out = name, out
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.log_path = out / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", PEER, name, str(out), json.dumps(config)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                         env=env, start_new_session=True)
        groups.append(self.proc.pid)
        self.rounds: dict[str, int] = {"averaged": 0, "skipped": 0, "group": 0}
        self.done: dict[str, Any] = {}
        self.exited = False
        threading.Thread(target=self._read, args=(inbox,), daemon=True).start()

    def _read(self, inbox: queue.Queue[Line]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            inbox.put((self, line.rstrip("\n")))
        inbox.put((self, None))

    def take(self, line: str | None) -> None:
        if line is None:
            self.exited = True
            return
        kind, _, payload = line.partition(" ")
        if kind == "ROUND":
            self.rounds = json.loads(payload)
        elif kind == "DONE":
            self.done = json.loads(payload)

    def ask_to_stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        """Kill the process group if still alive and close our pipe ends."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()

    def weights(self, which: str) -> torch.Tensor:
        tensor: torch.Tensor = torch.load(self.out / f"{self.name}-{which}.pt", weights_only=True)
        return tensor

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class Swarm:
    """Driver peers of one gossip run."""

    def __init__(self, count: int, out: Path, bootstrap: list[str], groups: list[int], **config: Any) -> None:
        run_id = f"gossip-{uuid.uuid4().hex[:8]}"
        self.inbox: queue.Queue[Line] = queue.Queue()
        self.peers = [Peer(f"p{i}", out, {"run_id": run_id, "peers": bootstrap, "seed": 100 + i, **config},
                           groups, self.inbox) for i in range(count)]

    def close(self) -> None:
        for peer in self.peers:
            peer.close()

    def wait_until(self, condition: Callable[[Peer], bool], timeout: float) -> None:
        wait_until(self.inbox, self.peers, condition, timeout)

    def stop(self) -> list[dict[str, Any]]:
        """Stop every peer at once (so none averages on without the others); their final numbers."""
        for peer in self.peers:
            peer.ask_to_stop()
        for peer in self.peers:
            assert peer.proc.wait(60) == 0, peer.log_tail()
        self.wait_until(lambda p: p.exited, timeout=30)
        return [peer.done for peer in self.peers]


def wait_until(inbox: queue.Queue[Line], peers: list[Peer], condition: Callable[[Peer], bool],
               timeout: float) -> None:
    """Read the peers' lines until ``condition`` holds for each of them; fail on timeout or an early exit."""
    deadline = time.monotonic() + timeout
    while not all(condition(peer) for peer in peers):
        remaining = deadline - time.monotonic()
        try:
            peer, line = inbox.get(timeout=max(0.0, remaining))
        except queue.Empty:
            tails = "\n\n".join(f"--- {p.name} {p.rounds}\n{p.log_tail()}" for p in peers)
            pytest.fail(f"condition not met within {timeout}s\n{tails}")
        peer.take(line)
        if peer.exited and not peer.done:
            pytest.fail(f"{peer.name} exited early ({peer.proc.poll()}):\n{peer.log_tail()}")


def distances(vectors: list[torch.Tensor]) -> list[float]:
    return [float((a - b).norm()) for i, a in enumerate(vectors) for b in vectors[i + 1:]]


@pytest.fixture
def swarms(short_tmp: Path, bootstrap: list[str], process_groups: list[int]) -> Iterator[Callable[..., Swarm]]:
    """Start driver swarms with ``swarms(count, **config)``; all of them are reaped at teardown."""
    started: list[Swarm] = []

    def start(count: int, **config: Any) -> Swarm:
        started.append(Swarm(count, short_tmp, bootstrap, process_groups, **config))
        return started[-1]

    yield start
    for swarm in started:
        swarm.close()


@pytest.mark.timeout(150)
def test_three_peers_get_closer_while_they_train(swarms: Callable[..., Swarm]) -> None:
    swarm = swarms(3, alpha=1.0, lr=0.01, step_s=0.02)
    # Until all three have joined, a round may pair two of them: wait for a round of the whole swarm.
    swarm.wait_until(lambda p: p.rounds["averaged"] >= 2 and p.rounds["group"] == 3, timeout=120)
    results = swarm.stop()
    peers = swarm.peers

    before = distances([p.weights("init") for p in peers])
    after = distances([p.weights("final") for p in peers])
    # Different random inits start far apart (and training alone would not bring them together);
    # after full averages only the local steps taken since the last round separate them (~0.2 here;
    # more on a loaded machine, where one peer may step on longer than the others).
    assert min(before) > 1.0
    assert max(after) < 0.25 * min(before), (before, after)
    for result in results:
        assert result["averaged"] >= 2 and result["steps"] > 0
        # local_epoch counts the swarm's samples: about three peers' worth of this peer's own.
        assert result["epoch"] >= result["steps"] * 8 // 64


@pytest.mark.timeout(150)
def test_alpha_moves_peers_only_part_way(swarms: Callable[..., Swarm]) -> None:
    # A learning rate too small to move float32 weights: only averaging changes them.
    swarm = swarms(2, alpha=0.5, lr=1e-12, step_s=0.01)
    swarm.wait_until(lambda p: p.rounds["averaged"] >= 1, timeout=120)
    swarm.stop()
    peers = swarm.peers
    a0, b0 = (p.weights("init") for p in peers)
    a1, b1 = (p.weights("first") for p in peers)
    # avg = (a0 + b0) / 2 and a1 = a0 + 0.5 * (avg - a0)
    torch.testing.assert_close(a1, 0.75 * a0 + 0.25 * b0, rtol=0, atol=1e-5)
    torch.testing.assert_close(b1, 0.25 * a0 + 0.75 * b0, rtol=0, atol=1e-5)
    assert float((a1 - b1).norm()) == pytest.approx(0.5 * float((a0 - b0).norm()), rel=1e-3)


def test_blend_keeps_local_progress_made_during_the_round() -> None:
    snapshot = torch.tensor([1.0, 2.0])
    averaged = torch.tensor([3.0, 0.0])
    live = snapshot.clone()
    gossip.blend_(live, averaged, snapshot, alpha=1.0)
    assert live.tolist() == [3.0, 0.0]  # untouched since the snapshot: replaced by the average
    live = snapshot.clone()
    gossip.blend_(live, averaged, snapshot, alpha=0.25)
    assert live.tolist() == [1.5, 1.5]  # (1 - alpha) * p + alpha * avg
    live = snapshot + torch.tensor([0.5, -0.5])  # local steps taken while the round ran
    gossip.blend_(live, averaged, snapshot, alpha=1.0)
    assert live.tolist() == [3.5, -0.5]


def test_averager_prefixes_never_mix_runs() -> None:
    assert gossip.averager_prefix("imagenet") == "imagenet_gossip"
    dotted = [gossip.averager_prefix(run_id) for run_id in ("a.b", "a_b", "a.b.c")]
    assert all("." not in prefix for prefix in dotted) and len(set(dotted)) == 3


@pytest.mark.timeout(150)
def test_a_lone_peer_keeps_training_and_skips_empty_rounds(short_tmp: Path, demo_cache: Path,
                                                           bootstrap: list[str], process_groups: list[int]) -> None:
    changes = {"averaging": {"strategy": "gossip", "average_every_steps": 5, "matchmaking_time": 0.5}}
    trainer = Trainer(make_launch(short_tmp, demo_cache, bootstrap, changes=changes), process_groups)
    assert trainer.wait_type("resumed")["source"] == "fresh"

    def skipped_rounds() -> int:
        return trainer.log_path.read_text(errors="replace").count("gossip round skipped")

    deadline = time.monotonic() + 60
    progress = trainer.wait_type("progress")
    while skipped_rounds() < 2:
        progress = trainer.wait_type("progress", timeout=max(1.0, deadline - time.monotonic()))
    later = trainer.wait_for(lambda e: e["type"] == "progress" and e["step"] > progress["step"])
    # A lone peer's epoch counts its own samples: 64 a global step, 8 a local step.
    assert later["epoch"] == later["samples"] // 64 and later["lr"] == pytest.approx(0.05)
    trainer.proc.send_signal(signal.SIGTERM)
    assert trainer.wait_exit() == 0
    assert trainer.drain()[-1]["type"] == "stopped"
    log = trainer.log_path.read_text(errors="replace")
    assert "gossip round averaged" not in log
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:5000]
