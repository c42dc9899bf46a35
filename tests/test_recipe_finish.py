"""A run that reached ``[run] max_epochs`` stays finished: the supervisor does not restart its trainer."""

from __future__ import annotations

from pathlib import Path

from hivemindd.host.supervisor import Supervisor
from hivemindd.wire.states import TrainerState as S
from tests.test_supervisor import FakeSpawner, launch, until, with_supervisor


def test_a_finished_run_is_not_restarted_until_the_owner_rejoins(tmp_path: Path) -> None:
    async def scenario(sup: Supervisor, spawner: FakeSpawner) -> None:
        sup.want("demo", launch, paused=False)
        await until(lambda: sup.state is S.STARTING)
        spawner.on_event({"type": "started", "peer_id": "Qm1"})
        spawner.on_event({"type": "warning", "kind": "checkpoint_corrupt", "message": "latest.pt: unreadable"})
        spawner.on_event({"type": "finished", "step": 80, "epoch": 10, "dataset_epoch": 1.0, "path": "/r/final.pt"})
        spawner.handles[0].finish(0)
        await until(lambda: sup.state is S.STOPPED)
        snap = sup.snapshot()
        assert snap.finished == "/r/final.pt" and snap.last_warning == "latest.pt: unreadable"
        assert snap.restarts == 0 and snap.last_exit_code == 0 and snap.retry_in_s is None
        sup.want("demo", launch, paused=False)  # the reconciler repeating itself changes nothing
        await until(lambda: sup.state is S.STOPPED)
        assert len(spawner.handles) == 1
        sup.want("demo", launch, paused=False, user_action=True)  # the owner rejoins: ask the trainer again
        await until(lambda: len(spawner.handles) == 2)
    with_supervisor(scenario, tmp_path)


def test_a_clean_exit_without_finishing_is_still_restarted(tmp_path: Path) -> None:
    async def scenario(sup: Supervisor, spawner: FakeSpawner) -> None:
        sup.want("demo", launch, paused=False)
        await until(lambda: len(spawner.handles) == 1)
        spawner.handles[0].finish(0)
        await until(lambda: len(spawner.handles) == 2)
    with_supervisor(scenario, tmp_path)
