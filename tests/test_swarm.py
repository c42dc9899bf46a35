"""hivemind facts the trainer relies on, checked against the installed hivemind.

hivemind.Optimizer leaves sockets and event loops to the garbage collector, which the
test suite's warnings-as-errors would blame on whichever test runs last, so the
Optimizer checks run in a child interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hivemindd.trainer import swarm
from hivemindd.trainer.model import batchnorm_buffers

LONE_PEER = textwrap.dedent("""
    import json, sys, time
    import torch
    from torch import nn
    from hivemindd.wire.launch import HostSettings, TrainerLaunch
    from hivemindd.wire.spec import RunSpec
    from hivemindd.trainer import strategies, swarm
    from hivemindd.trainer.model import batchnorm_buffers

    spec = RunSpec.from_dict({
        "data": {"train": "demo://shapes/train", "train_samples": 100},
        "optimizer": {"target_batch_size": 16, "lr": 0.1},
        "averaging": {"matchmaking_time": 1.0, "averaging_timeout": 5.0},
    })
    launch = TrainerLaunch(run_id="lone", spec=spec, host=HostSettings(batch_size=4), work_dir=sys.argv[1],
                           cache_dir=sys.argv[1], initial_peers=())
    dht = swarm.start_dht(launch)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    opt = strategies.build(launch, dht, model, swarm.BufferSync(batchnorm_buffers(model)).tensors)
    out = {"peers": opt.peers_with_progress(), "lr": opt.current_lr(),
           "has_scheduler": opt.scheduler is not None}
    started = time.monotonic()
    out["loaded"] = opt.load_state_from_peers()
    out["load_s"] = time.monotonic() - started
    model(torch.randn(4, 4)).sum().backward()
    opt.step()
    out["epoch_in_state_dict"] = opt.state_dict()["state"]["local_epoch"] == opt.local_epoch
    opt.shutdown()
    dht.shutdown()
    print("RESULT " + json.dumps(out), flush=True)
""")


@pytest.mark.timeout(90)
def test_a_lone_peer_finds_nobody_and_loading_returns_at_once(short_tmp: Path, process_groups: list[int]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", LONE_PEER, str(short_tmp)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    process_groups.append(proc.pid)
    output, _ = proc.communicate(timeout=80)
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, output[-5000:]
    result = json.loads(lines[0].removeprefix("RESULT "))
    assert result["peers"] == 0
    assert result["loaded"] is False
    assert result["load_s"] < 10
    assert result["lr"] == pytest.approx(0.1) and result["has_scheduler"]
    assert result["epoch_in_state_dict"]


def test_batchnorm_buffers_on_cpu_are_shared_directly() -> None:
    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    buffers = batchnorm_buffers(model)
    # running_mean and running_var; num_batches_tracked is an integer and stays local
    assert [tuple(b.shape) for b in buffers] == [(8,), (8,)]
    assert all(b.dtype == torch.float32 for b in buffers)
    sync = swarm.BufferSync(buffers)
    assert sync.tensors is buffers
    sync.push()
    sync.pull()  # no-ops on CPU


def test_run_ids_with_dots_get_a_prefix_hivemind_accepts() -> None:
    from hivemindd.trainer.strategies.gossip import averager_prefix
    from hivemindd.trainer.swarm import hivemind_run_id

    assert hivemind_run_id("imagenet-distributed") == "imagenet-distributed"  # unchanged: existing swarms keep meeting
    dotted, underscored = hivemind_run_id("in1k.v2"), hivemind_run_id("in1k_v2")
    assert "." not in dotted and dotted != underscored
    assert averager_prefix("in1k.v2") == f"{dotted}_gossip"
