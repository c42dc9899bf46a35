"""The trainer state machine and restart policy, driven through a spawner seam (no forking)."""

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from hivemindd.host.logfile import TrainerLog
from hivemindd.host.restarts import RestartPolicy, RestartTracker
from hivemindd.host.supervisor import Supervisor
from hivemindd.wire.launch import HostSettings, TrainerLaunch
from hivemindd.wire.spec import RunSpec
from hivemindd.wire.states import TrainerState

S = TrainerState


def test_backoff_doubles_and_caps_with_bounded_jitter() -> None:
    policy = RestartPolicy(base_delay_s=1, max_delay_s=8, jitter=0.1)
    assert [policy.delay(n, 0.5) for n in range(1, 7)] == [1, 2, 4, 8, 8, 8]
    assert policy.delay(3, 0.0) == pytest.approx(3.6) and policy.delay(3, 1.0) == pytest.approx(4.4)


def test_crashloop_after_repeated_fast_failures_and_reset_after_stable_run() -> None:
    policy = RestartPolicy(crashloop_failures=3, crashloop_window_s=100, stable_after_s=60, crashloop_cooldown_s=300)
    tracker = RestartTracker(policy)
    now = 1000.0
    assert tracker.record_exit(now - 5, now, 0.5) == (False, 1.0)
    assert tracker.record_exit(now, now + 5, 0.5) == (False, 2.0)
    assert tracker.record_exit(now + 5, now + 10, 0.5) == (True, 300)
    # A trainer that ran for an hour and then died is restarted quickly, not parked.
    assert tracker.record_exit(now + 10, now + 3610, 0.5) == (False, 1.0)
    # Failures spread beyond the window never add up to a crashloop.
    tracker.reset()
    assert all(not tracker.record_exit(t - 1, t, 0.5)[0] for t in (0.0, 150.0, 300.0, 450.0))


def test_runs_that_checkpoint_never_crashloop_and_restart_at_once() -> None:
    """Killed again and again (the OOM killer) but saving progress each time: no crashloop, no growing wait."""
    tracker = RestartTracker(RestartPolicy())
    for t in range(0, 100, 10):
        assert tracker.record_exit(float(t), t + 5.0, 0.5, progressed=True) == (False, 1.0)
    assert tracker.record_exit(100.0, 105.0, 0.5) == (False, 2.0)  # one that saved nothing counts again


def test_runs_that_trained_but_saved_nothing_back_off_without_crashloop() -> None:
    """Killed after some steps but before a checkpoint, many times: never parked, but no busy loop either."""
    tracker = RestartTracker(RestartPolicy(crashloop_failures=3, max_delay_s=8))
    delays = [tracker.record_exit(float(t), t + 5.0, 0.5, trained=True) for t in range(0, 60, 10)]
    assert delays == [(False, 1.0), (False, 2.0), (False, 4.0), (False, 8.0), (False, 8.0), (False, 8.0)]
    # Failing at start is still going nowhere: those count towards crashloop as before.
    assert [tracker.record_exit(t, t + 1.0, 0.5)[0] for t in (70.0, 80.0, 90.0)] == [False, False, True]


class FakeHandle:
    def __init__(self, pid: int, obeys_sigterm: bool) -> None:
        self.pid = pid
        self.obeys_sigterm = obeys_sigterm
        self.exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.signals: list[str] = []

    async def wait(self) -> int:
        return await asyncio.shield(self.exit)

    def finish(self, code: int) -> None:
        if not self.exit.done():
            self.exit.set_result(code)

    def terminate(self) -> None:
        self.signals.append("TERM")
        if self.obeys_sigterm:
            self.finish(0)

    def kill(self) -> None:
        self.signals.append("KILL")
        self.finish(-9)


class FakeSpawner:
    def __init__(self) -> None:
        self.handles: list[FakeHandle] = []
        self.obeys_sigterm = True
        self.on_event: Callable[[dict[str, Any]], None] = lambda e: None

    async def spawn(self, launch: TrainerLaunch, on_event: Any, on_line: Any) -> FakeHandle:
        self.on_event = on_event
        handle = FakeHandle(1000 + len(self.handles), self.obeys_sigterm)
        self.handles.append(handle)
        return handle


def launch() -> TrainerLaunch:
    return TrainerLaunch(run_id="demo", spec=RunSpec(), host=HostSettings(), work_dir="/nonexistent",
                         cache_dir="/nonexistent", initial_peers=())


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.005)
    await asyncio.wait_for(poll(), timeout)


def with_supervisor(test: Callable[[Supervisor, FakeSpawner], Awaitable[None]], tmp_path: Path,
                    hang_timeout_s: float = 900.0, **policy: float) -> None:
    async def main() -> None:
        spawner = FakeSpawner()
        fast = RestartPolicy(**{"base_delay_s": 0.01, "max_delay_s": 0.05, "crashloop_cooldown_s": 0.2, **policy})
        trainer_log = TrainerLog(tmp_path / "t.log")
        sup = Supervisor(spawner, trainer_log, policy=fast, stop_timeout_s=0.2, hang_timeout_s=hang_timeout_s)
        task = asyncio.create_task(sup.run())
        try:
            await test(sup, spawner)
        finally:
            await sup.shutdown()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            trainer_log.close()
    asyncio.run(main())


def test_start_ready_crash_restart_pause_resume_leave(tmp_path: Path) -> None:
    async def scenario(sup: Supervisor, spawner: FakeSpawner) -> None:
        sup.want("demo", launch, paused=False)
        await until(lambda: sup.state is S.STARTING)
        spawner.on_event({"type": "started", "peer_id": "Qm1"})
        spawner.on_event({"type": "progress", "step": 7, "epoch": 1, "loss": 2.0, "shards_failed": 2})
        assert sup.state is S.RUNNING and sup.snapshot().step == 7 and sup.snapshot().shards_failed == 2
        spawner.handles[0].finish(-9)  # killed from outside
        await until(lambda: len(spawner.handles) == 2)
        assert sup.restarts == 1 and sup.state is S.STARTING
        assert sup.snapshot().step is None  # the dead process's progress is not the new one's (issue 10)
        sup.want("demo", launch, paused=True, user_action=True)
        await until(lambda: sup.state is S.PAUSED)
        assert spawner.handles[1].signals == ["TERM"] and sup.snapshot().pid is None
        sup.want("demo", launch, paused=False, user_action=True)
        await until(lambda: len(spawner.handles) == 3)
        assert sup.restarts == 1  # resuming is not a restart
        sup.want(None, None, paused=False, user_action=True)
        await until(lambda: sup.state is S.STOPPED)
        assert spawner.handles[2].signals == ["TERM"]
    with_supervisor(scenario, tmp_path)


def test_repeated_failures_park_in_crashloop_then_retry_after_cooldown(tmp_path: Path) -> None:
    async def scenario(sup: Supervisor, spawner: FakeSpawner) -> None:
        sup.want("demo", launch, paused=False)
        for n in range(1, 4):
            await until(lambda n=n: len(spawner.handles) == n)  # type: ignore[misc]
            spawner.on_event({"type": "error", "message": "CUDA requested on a CPU host"})
            spawner.handles[-1].finish(1)
        await until(lambda: sup.state is S.CRASHLOOP)
        snap = sup.snapshot()
        assert snap.last_error == "CUDA requested on a CPU host" and snap.retry_in_s is not None
        assert any("crashloop" in line for line in sup.error_lines())
        await until(lambda: len(spawner.handles) == 4, timeout=5)  # retried after the cooldown
    with_supervisor(scenario, tmp_path, crashloop_failures=3)


def test_trainers_killed_after_steps_of_their_own_are_never_parked(tmp_path: Path) -> None:
    """Each resumes at step 10 (its checkpoint), trains a little, is killed before its next checkpoint."""
    async def scenario(sup: Supervisor, spawner: FakeSpawner) -> None:
        sup.want("demo", launch, paused=False)
        for n in range(1, 6):
            await until(lambda n=n: len(spawner.handles) == n)  # type: ignore[misc]
            spawner.on_event({"type": "started", "peer_id": "Qm1"})
            assert sup.snapshot().run_steps == 0  # a new process: no steps of its own yet
            spawner.on_event({"type": "resumed", "source": "checkpoint", "step": 10, "epoch": 1})
            spawner.on_event({"type": "progress", "step": 13, "epoch": 1})
            assert sup.snapshot().run_steps == 3
            spawner.handles[-1].finish(-9)
        await until(lambda: len(spawner.handles) == 6)
        assert sup.state is S.STARTING and sup.restarts == 5
        # Without steps of its own, the same deaths are going nowhere: parked after three.
        for n in range(6, 9):
            await until(lambda n=n: len(spawner.handles) == n)  # type: ignore[misc]
            spawner.handles[-1].finish(-9)
        await until(lambda: sup.state is S.CRASHLOOP)
    with_supervisor(scenario, tmp_path, crashloop_failures=3, crashloop_cooldown_s=60)


def test_config_error_exit_goes_straight_to_crashloop_and_user_action_retries(tmp_path: Path) -> None:
    async def scenario(sup: Supervisor, spawner: FakeSpawner) -> None:
        sup.want("demo", launch, paused=False)
        await until(lambda: len(spawner.handles) == 1)
        spawner.on_event({"type": "error", "message": "data.train: no shards match /x"})
        spawner.handles[0].finish(2)
        await until(lambda: sup.state is S.CRASHLOOP)
        assert len(spawner.handles) == 1
        sup.want("demo", launch, paused=False, user_action=True)  # the owner fixed something and rejoined
        await until(lambda: len(spawner.handles) == 2)
    with_supervisor(scenario, tmp_path, crashloop_cooldown_s=60)


def test_trainer_ignoring_sigterm_is_killed_after_the_stop_timeout(tmp_path: Path) -> None:
    async def scenario(sup: Supervisor, spawner: FakeSpawner) -> None:
        spawner.obeys_sigterm = False
        sup.want("demo", launch, paused=False)
        await until(lambda: len(spawner.handles) == 1)
        sup.want(None, None, paused=False)
        await until(lambda: sup.state is S.STOPPED)
        assert spawner.handles[0].signals == ["TERM", "KILL"]
    with_supervisor(scenario, tmp_path)


def test_a_silent_trainer_is_killed_restarted_and_reported(tmp_path: Path) -> None:
    async def scenario(sup: Supervisor, spawner: FakeSpawner) -> None:
        sup.want("demo", launch, paused=False)
        await until(lambda: len(spawner.handles) == 1)
        spawner.on_event({"type": "started", "peer_id": "Qm1"})
        for step in range(3):  # events keep it alive well past one hang_timeout
            await asyncio.sleep(0.1)
            spawner.on_event({"type": "progress", "step": step})
        assert spawner.handles[0].signals == []
        await until(lambda: len(spawner.handles) == 2)  # then silence: killed and restarted
        assert spawner.handles[0].signals == ["KILL"]
        # Why it was restarted, as the previous attempt's error (issue 10: errors belong to an attempt).
        assert sup.restarts == 1 and "hung" in (sup.snapshot().previous_error or "")
        assert sup.snapshot().last_error is None
        assert any("sent nothing for" in line for line in sup._log.tail(20))  # in the trainer log, for hmctl logs
    with_supervisor(scenario, tmp_path, hang_timeout_s=0.25)


def test_shutdown_while_the_loop_stops_the_trainer_stops_it_once(tmp_path: Path) -> None:
    async def scenario(sup: Supervisor, spawner: FakeSpawner) -> None:
        spawner.obeys_sigterm = False
        sup.want("demo", launch, paused=False)
        await until(lambda: len(spawner.handles) == 1)
        sup.want("demo", launch, paused=True)  # the loop starts stopping it …
        await until(lambda: sup.state is S.STOPPING)
        await sup.shutdown()  # … and the daemon shuts down meanwhile
        assert spawner.handles[0].signals == ["TERM", "KILL"]  # one stop, one kill at its timeout
    with_supervisor(scenario, tmp_path)


def test_failed_spawn_backs_off_instead_of_spinning(tmp_path: Path) -> None:
    calls = []

    def broken() -> TrainerLaunch:
        calls.append(1)
        raise OSError("spec file vanished")

    async def scenario(sup: Supervisor, spawner: FakeSpawner) -> None:
        sup.want("demo", broken, paused=False)
        await until(lambda: sup.state is S.CRASHLOOP)
        assert "spec file vanished" in (sup.last_error or "") and len(calls) == 3
    with_supervisor(scenario, tmp_path, crashloop_failures=3, crashloop_cooldown_s=60)


def test_illegal_transition_is_refused(tmp_path: Path) -> None:
    async def scenario(sup: Supervisor, spawner: FakeSpawner) -> None:
        with pytest.raises(RuntimeError, match="stopped → running"):
            sup.transition(S.RUNNING, "no trainer exists")
    with_supervisor(scenario, tmp_path)


def test_progress_errors_and_warnings_belong_to_one_run_and_one_attempt(tmp_path: Path) -> None:
    """Issue 10: after leave + join of another run, status showed the old run's step, epoch and loss."""
    async def scenario(sup: Supervisor, spawner: FakeSpawner) -> None:
        sup.want("old", launch, paused=False)
        await until(lambda: len(spawner.handles) == 1)
        old_events = spawner.on_event
        old_events({"type": "started", "peer_id": "QmOld"})
        old_events({"type": "progress", "step": 1687, "epoch": 160, "loss": 0.2007})
        old_events({"type": "warning", "message": "latest.pt is corrupt"})
        spawner.obeys_sigterm = False  # the old trainer takes its time to checkpoint and leave …
        spawner.handles[0].obeys_sigterm = False
        sup.want(None, None, paused=False, user_action=True)  # leave
        await until(lambda: sup.state is S.STOPPING)
        # … and reports while it goes: none of it may show up for the host (nor for the next run).
        old_events({"type": "progress", "step": 1688, "epoch": 160, "loss": 0.2})
        old_events({"type": "stopped", "step": 1688, "checkpoint_step": 1688})
        old_events({"type": "error", "message": "FileNotFoundError: shard gone"})
        sup.want("new", launch, paused=False, user_action=True)  # join another run while it stops
        snap = sup.snapshot()
        assert (snap.step, snap.epoch, snap.loss, snap.checkpoint_step) == (None, None, None, None)
        assert snap.last_warning is None and snap.last_error is None and snap.trainer_peer_id is None
        spawner.handles[0].finish(-9)
        await until(lambda: len(spawner.handles) == 2)
        old_events({"type": "progress", "step": 1689, "epoch": 161, "loss": 0.1})  # a late line from the old pipe
        snap = sup.snapshot()
        assert snap.step is None and snap.epoch is None and snap.last_exit_code is None
        spawner.on_event({"type": "started", "peer_id": "QmNew"})
        spawner.on_event({"type": "resumed", "source": "fresh", "step": 0, "epoch": 0})
        spawner.on_event({"type": "progress", "step": 3, "epoch": 0, "loss": 2.3})
        assert (sup.snapshot().step, sup.snapshot().trainer_peer_id) == (3, "QmNew")

        # Within one run, a new attempt starts clean too; the checkpoint on disk is the run's and stays.
        spawner.on_event({"type": "checkpoint", "step": 3})
        spawner.on_event({"type": "warning", "message": "checkpoint disk nearly full"})
        spawner.on_event({"type": "error", "message": "RuntimeError: CUDA error"})
        spawner.handles[1].finish(1)
        await until(lambda: sup.state is S.BACKOFF or len(spawner.handles) == 3)
        await until(lambda: len(spawner.handles) == 3)
        snap = sup.snapshot()
        assert snap.step is None and snap.loss is None and snap.last_warning is None
        assert snap.last_error is None and snap.checkpoint_step == 3
        assert snap.previous_error == "RuntimeError: CUDA error"  # labelled as the attempt before this one
        spawner.handles[2].finish(1)  # dies without a word: its own exit code, not the last attempt's message
        await until(lambda: sup.state is S.BACKOFF)
        assert sup.snapshot().last_error == "trainer exited with code 1"
        sup.want("other", launch, paused=False, user_action=True)
        assert sup.snapshot().previous_error is None and sup.snapshot().last_error is None
    with_supervisor(scenario, tmp_path)


def test_crashloop_shows_the_failing_attempts_own_lines(tmp_path: Path) -> None:
    """Issue 10: under crashloop, status showed the previous trainer's shutdown traceback instead."""
    async def scenario(sup: Supervisor, spawner: FakeSpawner) -> None:
        sup.want("old", launch, paused=False)
        await until(lambda: len(spawner.handles) == 1)
        previous = ["Traceback (most recent call last):", "FileNotFoundError: [Errno 2] shard-000.tar",
                    "Task was destroyed but it is pending!"]
        for line in previous:  # the old trainer's shutdown, written to the log as it leaves
            sup._log.write(line)
        sup.want(None, None, paused=False, user_action=True)
        await until(lambda: sup.state is S.STOPPED)
        sup.want("new", launch, paused=False, user_action=True)
        await until(lambda: len(spawner.handles) == 2)
        sup._log.write("2025-01-31 14:05:00,123 ERROR hivemindd.trainer: host.device: 'cuda' was asked for but "
                       "torch sees no CUDA GPU (use 'auto' or 'cpu')")
        spawner.on_event({"type": "error", "message": "host.device: 'cuda' was asked for"})
        spawner.handles[1].finish(2)
        await until(lambda: sup.state is S.CRASHLOOP)
        lines = sup.error_lines()
        assert any("torch sees no CUDA GPU" in line for line in lines)
        assert any("-> crashloop" in line for line in lines)  # the daemon's note on this attempt stays
        assert not set(previous) & set(lines), lines
        assert len(sup.error_lines(1)) == 1 and "-> crashloop" in sup.error_lines(1)[0]
    with_supervisor(scenario, tmp_path, crashloop_cooldown_s=60)
