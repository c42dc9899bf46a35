"""The learning rate is the global epoch's, whatever way a peer got to that epoch.

hivemind steps the scheduler up to a downloaded epoch after the download has
already replaced the optimizer's LR with the sender's (decayed) one; a chained
``MultiStepLR`` then decays twice. These tests pin the fix (schedule.py) in-process
and with real trainers: a newcomer that loads state from a peer past two
milestones, and a trainer resumed from its checkpoint.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from hivemindd.trainer.schedule import LrSchedule
from hivemindd.wire.launch import TrainerLaunch
from hivemindd.wire.spec import RunSpec
from tests.test_trainer_process import Event, Trainer, make_launch

LR, GAMMA = 0.05, 0.1
# demo spec: 4000 samples per dataset epoch, 64 per global step → milestones at global steps 3 and 6
SCHEDULE = {"optimizer": {"lr": LR, "target_batch_size": 64, "milestones": [0.05, 0.1], "gamma": GAMMA}}


def expected_lr(epoch: int) -> float:
    return LR * GAMMA ** sum(epoch >= m for m in (3, 6))


def spec(**optimizer: Any) -> RunSpec:
    return RunSpec.from_dict({"data": {"train": "demo://shapes/train", "train_samples": 4000},
                              "optimizer": {"target_batch_size": 64, **optimizer}})


def test_schedule_milestones_warmup_and_linear_scaling() -> None:
    plain = LrSchedule.from_spec(spec(lr=0.1, milestones=[0.05, 0.1], gamma=0.1))
    assert plain.milestones == (3, 6)
    assert [plain.lr_at(e) for e in (0, 2, 3, 5, 6, 100)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    scaled = LrSchedule.from_spec(spec(lr=0.1, lr_scaling="linear", warmup_epochs=0.064, milestones=[1]))
    assert scaled.peak_lr == pytest.approx(0.1 * 64 / 256) and scaled.warmup_steps == 4
    assert [scaled.lr_at(e) for e in range(6)] == pytest.approx([0.00625, 0.0125, 0.01875, 0.025, 0.025, 0.025])


def _download(schedule: LrSchedule, factory: Any, epoch: int) -> float:
    """What hivemind's load_state_from_peers does: take the sender's optimizer state, then step to its epoch."""
    sender_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=schedule.peak_lr)
    sender = factory(sender_opt)
    for _ in range(epoch):
        sender_opt.step()
        sender.step()
    receiver_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=schedule.peak_lr)
    receiver = factory(receiver_opt)
    receiver_opt.load_state_dict(sender_opt.state_dict())
    while receiver._step_count <= epoch:  # hivemind's StateAverager._update_scheduler
        receiver.step()
    return float(receiver_opt.param_groups[0]["lr"])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lr_after_a_download_is_the_epochs_not_decayed_twice() -> None:
    schedule = LrSchedule.from_spec(spec(lr=0.1, milestones=[0.05, 0.1], gamma=0.1))
    assert _download(schedule, schedule.scheduler, 7) == pytest.approx(schedule.lr_at(7))
    multistep = _download(schedule, lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [3, 6], 0.1), 7)
    assert multistep == pytest.approx(schedule.lr_at(7) * 0.01)  # the bug this design avoids


def _check_lrs(events: list[Event]) -> int:
    progress = [e for e in events if e["type"] == "progress"]
    for event in progress:
        assert event["lr"] == pytest.approx(expected_lr(event["epoch"])), event
    return len(progress)


@pytest.mark.timeout(180)
def test_lr_after_load_from_peers_and_after_resume(short_tmp: Path, demo_cache: Path, bootstrap: list[str],
                                                   process_groups: list[int]) -> None:
    first = Trainer(make_launch(short_tmp, demo_cache, bootstrap, name="a", changes=SCHEDULE), process_groups)
    run_id = TrainerLaunch.from_json((short_tmp / "a.json").read_text()).run_id
    first.wait_for(lambda e: e["type"] == "progress" and e["epoch"] >= 7, timeout=90)

    late_launch = make_launch(short_tmp, demo_cache, bootstrap, name="b", run_id=run_id, changes=SCHEDULE)
    late = Trainer(late_launch, process_groups)
    resumed = late.wait_type("resumed")
    assert resumed["source"] == "peers" and resumed["epoch"] >= 7
    late.wait_for(lambda e: e["type"] == "checkpoint")
    late.wait_for(lambda e: e["type"] == "progress" and e["epoch"] > resumed["epoch"])
    late.proc.send_signal(signal.SIGTERM)
    assert late.wait_exit(90) == 0
    assert _check_lrs(late.drain()) >= 2

    again = Trainer(late_launch, process_groups)
    resumed = again.wait_type("resumed")
    assert resumed["source"] == "checkpoint" and resumed["epoch"] >= 7
    again.wait_for(lambda e: e["type"] == "progress")
    for trainer in (again, first):
        trainer.proc.send_signal(signal.SIGTERM)
    for trainer in (again, first):
        assert trainer.wait_exit(90) == 0
    assert _check_lrs(again.drain()) >= 1
    assert _check_lrs(first.drain()) >= 2

