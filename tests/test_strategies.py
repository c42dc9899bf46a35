"""Every registered strategy keeps the contract the trainer loop relies on (``strategies.Strategy``).

Each strategy runs with real hivemind as a lone peer on its own loopback DHT: a tiny
model on generated data, a target batch of four local steps, an LR milestone at global
step 2. hivemind leaves sockets and event loops to the garbage collector, which the
suite's warnings-as-errors would blame on a later test, so each run is a child
interpreter that prints its findings as one JSON line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from hivemindd.trainer.strategies import STRATEGIES
from hivemindd.wire.spec import AveragingSpec

CONTRACT = textwrap.dedent("""
    import io, json, sys, time
    import torch
    from torch import nn
    from hivemindd.trainer import strategies, swarm
    from hivemindd.trainer.model import batchnorm_buffers
    from hivemindd.trainer.schedule import LrSchedule
    from hivemindd.wire.launch import HostSettings, TrainerLaunch
    from hivemindd.wire.spec import RunSpec

    name, work, target_epoch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    spec = RunSpec.from_dict({
        "data": {"train": "demo://shapes/train", "train_samples": 160},
        # 16 samples a global step, 4 a local step; 0.2 dataset epochs = global step 2
        "optimizer": {"target_batch_size": 16, "lr": 0.1, "milestones": [0.2], "gamma": 0.1},
        "averaging": {"strategy": name, "matchmaking_time": 0.5, "averaging_timeout": 5.0,
                      "average_every_steps": 2},
    })
    launch = TrainerLaunch(run_id=f"contract-{name}", spec=spec, host=HostSettings(batch_size=4), work_dir=work,
                           cache_dir=work, initial_peers=(), metadata_expiration_s=10.0)
    schedule = LrSchedule.from_spec(spec)
    dht = swarm.start_dht(launch)

    def tiny_model():
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def build():
        model = tiny_model()
        return model, strategies.build(launch, dht, model, swarm.BufferSync(batchnorm_buffers(model)).tensors)

    data = torch.Generator().manual_seed(0)
    teacher = torch.randn(4, 3, generator=data)

    def step(model, strategy):
        x = torch.randn(4, 4, generator=data)
        nn.functional.cross_entropy(model(x), (x @ teacher).argmax(1)).backward()
        flag = strategy.will_average()
        strategy.step()
        return flag

    def lr_ok(strategy):
        epoch = strategy.local_epoch
        return (abs(strategy.current_lr() - schedule.lr_at(epoch)) < 1e-12
                and strategy.scheduler.last_epoch == epoch)

    model, strategy = build()
    out = {"peers": strategy.peers_with_progress(), "live_peers": strategy.live_peers(), "lr_ok": lr_ok(strategy)}
    started = time.monotonic()
    out["loaded"] = strategy.load_state_from_peers()
    out["load_s"] = time.monotonic() - started
    epochs, flags, problems = [strategy.local_epoch], set(), []
    deadline = time.monotonic() + 90  # the test's own timeout is the real bound; this one reports the epochs
    while strategy.local_epoch < target_epoch and time.monotonic() < deadline:
        flags.add(type(step(model, strategy)).__name__)
        epoch, progress = strategy.local_epoch, strategy.progress()
        if epoch < epochs[-1]:
            problems.append(f"epoch went back from {epochs[-1]} to {epoch}")
        if not epoch <= progress <= epoch + 1:
            problems.append(f"progress {progress} outside epoch {epoch}")
        if not lr_ok(strategy):
            problems.append(f"lr {strategy.current_lr()} at epoch {epoch} (scheduler at {strategy.scheduler.last_epoch})")
        if epoch != epochs[-1]:
            epochs.append(epoch)
    out.update(epochs=epochs, flag_types=sorted(flags), problems=problems, lrs=[schedule.lr_at(e) for e in epochs])

    # What a checkpoint keeps must survive torch.save / torch.load(weights_only=True) and resume a new strategy.
    buffer = io.BytesIO()
    torch.save(strategy.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    saved_epoch = strategy.local_epoch
    started = time.monotonic()
    strategy.shutdown()
    out["shutdown_s"] = time.monotonic() - started
    model, resumed = build()
    resumed.load_state_dict(saved)
    resumed.announce_epoch()
    out["resumed_epoch"], out["saved_epoch"], out["resumed_lr_ok"] = resumed.local_epoch, saved_epoch, lr_ok(resumed)
    step(model, resumed)
    out["epoch_after_resumed_step"] = resumed.local_epoch
    started = time.monotonic()
    resumed.shutdown()
    out["second_shutdown_s"] = time.monotonic() - started
    dht.shutdown()
    print("RESULT " + json.dumps(out), flush=True)
""")


def test_the_registry_offers_exactly_the_strategies_a_spec_may_name() -> None:
    choices = next(f.metadata["choices"] for f in dataclasses.fields(AveragingSpec) if f.name == "strategy")
    assert sorted(STRATEGIES) == sorted(choices)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_each_strategy_keeps_the_loop_contract(name: str, short_tmp: Path, process_groups: list[int]) -> None:
    target_epoch = 3  # past the milestone at global step 2
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", CONTRACT, name, str(short_tmp), str(target_epoch)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    process_groups.append(proc.pid)
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=30)
        pytest.fail(f"the {name} contract run did not finish within 120 s:\n{output[-5000:]}")
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, output[-5000:]
    result: dict[str, Any] = json.loads(lines[0].removeprefix("RESULT "))

    # a lone peer: nobody else has progress, nothing to download, and it learns so at once
    assert result["peers"] == 0 and result["live_peers"] == 1
    assert result["loaded"] is False and result["load_s"] < 10
    # the local epoch advances step by step to the target, and the LR is the schedule's at every epoch
    assert result["epochs"][0] == 0 and result["epochs"][-1] >= target_epoch, result
    assert result["lr_ok"] and result["problems"] == [], result
    assert result["lrs"][0] == pytest.approx(0.1) and result["lrs"][-1] == pytest.approx(0.01)
    assert result["flag_types"] == ["bool"]
    # state_dict round-trips through a checkpoint into a fresh strategy, which trains on from there
    assert result["resumed_epoch"] == result["saved_epoch"] >= target_epoch
    assert result["resumed_lr_ok"]
    assert result["epoch_after_resumed_step"] >= result["resumed_epoch"]
    # shutdown returns (bounded by the spec's timeouts: a round in flight, then the averagers)
    assert result["shutdown_s"] < 30 and result["second_shutdown_s"] < 30
