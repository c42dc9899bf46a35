"""The trainer's lifecycle: named states, one ``transition()``, and a restart policy.

One task (``Supervisor.run``) owns the trainer process. The daemon only says what
it wants (``want``); the loop starts, stops and restarts the trainer to match,
with capped exponential backoff plus jitter, and parks it in ``crashloop`` after
repeated fast failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import structlog

from hivemindd.host.logfile import TrainerLog
from hivemindd.host.process import Spawner, TrainerHandle
from hivemindd.host.restarts import RestartPolicy, RestartTracker
from hivemindd.wire.launch import TrainerLaunch
from hivemindd.wire.states import TrainerEvent as E
from hivemindd.wire.states import TrainerExit, TrainerState
from hivemindd.wire.status import TrainerStatus

log = structlog.get_logger(__name__)

# A timed pause is checked at least this often: monotonic sleeps stop while a laptop is suspended, the wall clock not.
PAUSE_RECHECK_S = 30.0
# Progress fields the trainer reports that status shows as they are.
_REPORTED = ("step", "epoch", "loss", "samples_per_s", "lr", "samples", "shards_failed", "swarm_peers")
# What status keeps about a run from one trainer attempt to the next: the checkpoint on disk outlives
# the process. Everything else the trainer reported (progress, warnings, its peer id) belongs to one attempt.
_RUN_FACTS = ("checkpoint_step",)


S = TrainerState
# Every edge the supervisor may take; anything else is a bug and raises.
_EDGES: dict[TrainerState, set[TrainerState]] = {
    S.STOPPED: {S.STARTING, S.PAUSED},  # joined a run / joined while paused (daemon start)
    S.PAUSED: {S.STARTING, S.STOPPED},  # resume / leave
    S.STARTING: {S.RUNNING, S.STOPPING, S.BACKOFF, S.CRASHLOOP, S.STOPPED},  # … / run already finished
    S.RUNNING: {S.STOPPING, S.BACKOFF, S.CRASHLOOP, S.STOPPED},  # asked to stop / died / run finished
    S.STOPPING: {S.STOPPED, S.PAUSED},  # exited after SIGTERM (or SIGKILL past the timeout)
    S.BACKOFF: {S.STARTING, S.STOPPED, S.PAUSED},  # delay over / leave / pause
    S.CRASHLOOP: {S.STARTING, S.STOPPED, S.PAUSED},  # cooldown over or user action / leave / pause
}


@dataclass(frozen=True)
class Desired:
    """What the daemon wants: a trainer for ``key`` (None: none), or paused.

    A pause may end by itself at ``until`` (wall-clock seconds) and, with
    ``after_checkpoint``, lets a running trainer go on until its next checkpoint.
    """

    key: str | None
    factory: Callable[[], TrainerLaunch] | None
    paused: bool
    until: float | None = None
    after_checkpoint: bool = False


class PauseChange(enum.Enum):
    """What the supervisor tells the daemon about a pause, so desired state can follow."""

    TOOK_EFFECT = "took_effect"  # an after-checkpoint pause stopped the trainer (or found none running)
    EXPIRED = "expired"  # a timed pause reached its deadline: training resumes


class Supervisor:
    """Keeps the trainer process in the desired state; see the module docstring."""

    def __init__(
        self,
        spawner: Spawner,
        trainer_log: TrainerLog,
        *,
        policy: RestartPolicy | None = None,
        stop_timeout_s: float = 150.0,
        hang_timeout_s: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        on_pause_change: Callable[[PauseChange], None] | None = None,
    ) -> None:
        self._spawner = spawner
        self._log = trainer_log
        self._tracker = RestartTracker(policy or RestartPolicy())
        self._stop_timeout_s = stop_timeout_s
        self._hang_timeout_s = hang_timeout_s  # no event from the trainer for this long: it is hung
        self._last_event_at = 0.0
        self._stopping: asyncio.Future[None] | None = None
        self._clock = clock
        self._wall_clock = wall_clock
        self._rand = rand
        self._on_pause_change = on_pause_change
        self._desired = Desired(None, None, False)
        self._changed = asyncio.Event()
        self.state = S.STOPPED
        self._since = clock()
        self._retry_at: float | None = None
        self._handle: TrainerHandle | None = None
        self._handle_key: str | None = None
        self._started_at = 0.0
        self._checkpointed = False
        self._base_step = 0  # the step this trainer process resumed at: run_steps counts from there
        self._attempt = 0  # numbers trainer starts, so events of an earlier process are told apart
        self._attempt_key: str | None = None  # the desired key the current attempt was started for
        self._attempt_log_seq = 0  # the trainer log's last line before the current attempt began
        self._finished_key: str | None = None  # a run whose trainer said "finished" ([run] max_epochs): not restarted
        self._stop_requested = False
        self.restarts = 0
        self.info: dict[str, Any] = {}  # what the trainer reported: step, epoch, loss …
        self.last_error: str | None = None  # why the current attempt failed (or is failing)
        self.previous_error: str | None = None  # why the attempt before it failed, until this one trains
        self.last_exit_code: int | None = None

    # --- what the daemon says --------------------------------------------------------------

    def want(self, key: str | None, factory: Callable[[], TrainerLaunch] | None, paused: bool,
             user_action: bool = False, *, until: float | None = None, after_checkpoint: bool = False) -> None:
        """Ask for a trainer for ``key`` (or none); ``user_action`` retries a crashloop now.

        ``until`` and ``after_checkpoint`` qualify a pause: see ``Desired``.
        """
        if key != self._desired.key:  # another run (or none): nothing known so far is about it
            self.info = {}
            self.last_error = self.previous_error = None
            self.last_exit_code = None
        if user_action or key != self._desired.key:
            self._finished_key = None  # rejoining a finished run asks the trainer again (it says "finished" at once)
        self._desired = Desired(key, factory, paused, until if paused else None, paused and after_checkpoint)
        if user_action:
            self._tracker.reset()
            self._retry_at = None
        self._changed.set()

    def snapshot(self) -> TrainerStatus:
        """Where the trainer is and what it last reported (status.trainer, less what the daemon adds)."""
        retry_in = None if self._retry_at is None else max(0.0, round(self._retry_at - self._clock(), 1))
        return TrainerStatus(
            state=self.state.value,
            pid=self._handle.pid if self._handle else None,
            restarts=self.restarts,
            since_s=round(self._clock() - self._since, 1),
            retry_in_s=retry_in if self.state in (S.BACKOFF, S.CRASHLOOP) else None,
            last_error=self.last_error,
            previous_error=self.previous_error,
            last_exit_code=self.last_exit_code,
            step=self.info.get("step"),
            epoch=self.info.get("epoch"),
            checkpoint_step=self.info.get("checkpoint_step"),
            run_steps=self.info.get("run_steps"),
            loss=self.info.get("loss"),
            samples_per_s=self.info.get("samples_per_s"),
            lr=self.info.get("lr"),
            samples=self.info.get("samples"),
            shards_failed=self.info.get("shards_failed"),
            swarm_peers=self.info.get("swarm_peers"),  # peers it accumulates with, itself included
            resumed_from=self.info.get("resumed_from"),
            trainer_peer_id=self.info.get("peer_id"),
            last_warning=self.info.get("last_warning"),
            finished=self.info.get("finished"),  # final.pt of a run that reached [run] max_epochs
        )

    def error_lines(self, n: int = 20) -> list[str]:
        """The failed attempt's own last lines (its output and the daemon's notes on it), while it is down.

        Only lines written since that attempt began: the tail of the file would also show the previous
        trainer's shutdown, which says nothing about why this one failed.
        """
        if self.state not in (S.CRASHLOOP, S.BACKOFF):
            return []
        return [line for _, line in self._log.after(self._attempt_log_seq, 1 << 30)][-n:]

    # --- the loop ----------------------------------------------------------------------------

    def transition(self, new: TrainerState, reason: str) -> None:
        if new is self.state:
            return
        if new not in _EDGES[self.state]:
            raise RuntimeError(f"trainer state {self.state.value} → {new.value} is not allowed ({reason})")
        log.info("trainer.state", old=self.state.value, new=new.value, reason=reason)
        self._log.note(f"trainer {self.state.value} -> {new.value}: {reason}")
        self.state = new
        self._since = self._clock()

    async def run(self) -> None:
        """Reconcile forever; cancelled by ``shutdown`` once the trainer is down."""
        while True:
            self._changed.clear()
            self._expire_pause()
            desired = self._desired
            if self._handle is not None:
                if desired.key != self._handle_key or (desired.paused and not desired.after_checkpoint):
                    await self._stop_trainer("paused" if desired.paused else "left the run or settings changed")
                    continue
                await self._watch_trainer(self._pause_wait_s())
                continue
            if desired.key is None or desired.factory is None:
                self._retry_at = None
                self.transition(S.STOPPED, "no run joined")
            elif desired.paused:
                self._retry_at = None
                if desired.after_checkpoint:  # no trainer to wait for: the pause holds from now
                    self._pause_took_effect()
                self.transition(S.PAUSED, "paused by the owner")
                await self._wait_changed(self._pause_wait_s())
                continue
            elif desired.key == self._finished_key:
                self._retry_at = None
                self.transition(S.STOPPED, "the run is finished ([run] max_epochs reached)")
            elif self._retry_at is not None and self._clock() < self._retry_at:
                await self._wait_changed(self._retry_at - self._clock())
                continue
            else:
                await self._start_trainer(desired.key, desired.factory)
                continue
            await self._changed.wait()

    async def shutdown(self) -> None:
        """Stop the trainer (checkpoint on SIGTERM) and leave it stopped."""
        self.want(None, None, False)
        if self._stopping is not None and not self._stopping.done():
            await asyncio.shield(self._stopping)  # the loop is already stopping it
        if self._handle is not None:
            await self._stop_trainer("daemon shutting down")

    async def _start_trainer(self, key: str, factory: Callable[[], TrainerLaunch]) -> None:
        was_failure = self.state in (S.BACKOFF, S.CRASHLOOP)
        self._retry_at = None
        reason = "restart after failure" if was_failure else "resumed" if self.state is S.PAUSED else "run joined"
        # A new attempt: what the previous one reported or failed with is no longer this trainer's.
        self._attempt += 1
        self._attempt_key = key
        self._attempt_log_seq = self._log.seq
        self.info = {k: v for k, v in self.info.items() if k in _RUN_FACTS}
        self.previous_error = self.last_error if was_failure else None  # shown as the previous attempt's
        self.last_error = None
        self.transition(S.STARTING, reason)
        self._started_at = self._clock()  # a failed spawn must count as a fast failure too
        self._checkpointed = False  # this run saved progress (see RestartTracker.record_exit)
        self._base_step = 0
        self.info["run_steps"] = 0  # steps this trainer process took
        self._last_event_at = self._clock()
        try:
            launch = factory()
            handle = await self._spawner.spawn(launch, partial(self._on_event, self._attempt), self._log.write)
        except Exception as exc:  # a launch we cannot even build or exec: treat as a failed start
            self.last_error = f"cannot start the trainer: {exc}"
            log.error("trainer.spawn_failed", error=str(exc))
            self._after_failure(None)
            return
        if was_failure:
            self.restarts += 1
        self._handle, self._handle_key = handle, key
        self._stop_requested = False
        log.info("trainer.spawned", pid=handle.pid, run=key)

    def _pause_wait_s(self) -> float | None:
        """How long the loop may sleep before a timed pause must be looked at again (None: no deadline)."""
        if not self._desired.paused or self._desired.until is None:
            return None
        return min(PAUSE_RECHECK_S, max(0.0, self._desired.until - self._wall_clock()))

    def _expire_pause(self) -> None:
        """End a timed pause whose deadline passed (also one that passed while the daemon was down)."""
        desired = self._desired
        if desired.paused and desired.until is not None and self._wall_clock() >= desired.until:
            self._desired = replace(desired, paused=False, until=None, after_checkpoint=False)
            self._tracker.reset()  # the owner's pause, not a failure, kept the trainer down
            self._retry_at = None
            log.info("trainer.pause_expired")
            self._log.note("pause over: resuming training")
            self._notify(PauseChange.EXPIRED)

    def _pause_took_effect(self) -> None:
        self._desired = replace(self._desired, after_checkpoint=False)
        self._changed.set()
        self._notify(PauseChange.TOOK_EFFECT)

    def _notify(self, change: PauseChange) -> None:
        if self._on_pause_change is None:
            return
        try:
            self._on_pause_change(change)
        except Exception:  # the daemon's bookkeeping must not stop the supervisor's loop
            log.exception("trainer.pause_callback_failed", change=change.value)

    async def _watch_trainer(self, timeout: float | None = None) -> None:
        assert self._handle is not None
        hang_in = self._last_event_at + self._hang_timeout_s - self._clock()
        timeout = max(0.0, hang_in if timeout is None else min(timeout, hang_in))
        exit_task = asyncio.ensure_future(self._handle.wait())
        change_task = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait({exit_task, change_task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            change_task.cancel()
            if not exit_task.done():
                exit_task.cancel()
        if exit_task.done() and not exit_task.cancelled():
            self._after_failure(exit_task.result())
        elif self._clock() - self._last_event_at >= self._hang_timeout_s:
            await self._end_hung_trainer()

    async def _end_hung_trainer(self) -> None:
        """No event (progress, checkpoint …) for hang_timeout: kill the group and restart like after a crash."""
        assert self._handle is not None
        handle = self._handle
        silent = self._clock() - self._last_event_at
        log.warning("trainer.hung", pid=handle.pid, silent_s=round(silent))
        self._log.note(f"trainer sent nothing for {silent:.0f} s (hang_timeout {self._hang_timeout_s:.0f} s): "
                       "killing it")
        handle.kill()
        code = await handle.wait()
        self.last_error = f"trainer hung: no progress for {silent:.0f} s (hang_timeout); killed and restarted"
        self._after_failure(code)

    async def _stop_trainer(self, reason: str) -> None:
        """Stop the trainer; a second caller (shutdown while the loop stops it) waits for the same stop."""
        if self._stopping is None or self._stopping.done():
            self._stopping = asyncio.ensure_future(self._stop_trainer_once(reason))
        await asyncio.shield(self._stopping)

    async def _stop_trainer_once(self, reason: str) -> None:
        assert self._handle is not None
        handle = self._handle
        self.transition(S.STOPPING, reason)
        self._stop_requested = True
        handle.terminate()
        try:
            async with asyncio.timeout(self._stop_timeout_s):
                code = await handle.wait()
        except TimeoutError:
            log.warning("trainer.stop_timeout", pid=handle.pid, timeout_s=self._stop_timeout_s)
            self._log.note(f"trainer did not stop within {self._stop_timeout_s:.0f} s; killing it")
            handle.kill()
            code = await handle.wait()
        if self._attempt_key == self._desired.key:  # a trainer of a run we left says nothing about the next one
            self.last_exit_code = code
        self._handle = self._handle_key = None
        self.transition(S.PAUSED if self._desired.paused and self._desired.key else S.STOPPED, f"exited with {code}")

    def _after_failure(self, code: int | None) -> None:
        """The trainer died (or never started): back off, or park it in crashloop."""
        if code == TrainerExit.OK and self.info.get("finished"):  # it ended the run as the spec says: not a failure
            self._finished_key, self.last_exit_code = self._handle_key, code
            self._handle = self._handle_key = None
            self.transition(S.STOPPED, "the run is finished ([run] max_epochs reached)")
            return
        self._handle = self._handle_key = None
        self.last_exit_code = code
        if code is not None and self.last_error is None:
            self.last_error = f"trainer exited with code {code}"
        if code == TrainerExit.CONFIG:
            crashloop, delay = True, self._tracker.policy.crashloop_cooldown_s
        else:
            crashloop, delay = self._tracker.record_exit(self._started_at, self._clock(), self._rand(),
                                                         progressed=self._checkpointed,
                                                         trained=self.info.get("run_steps", 0) > 0)
        self._retry_at = self._clock() + delay
        if crashloop:
            self.transition(S.CRASHLOOP, f"{self.last_error}; retrying in {delay:.0f} s")
        else:
            self.transition(S.BACKOFF, f"exit code {code}; restarting in {delay:.1f} s")

    async def _wait_changed(self, timeout: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel that races the event.
            async with asyncio.timeout(None if timeout is None else max(0.0, timeout)):
                await self._changed.wait()

    def _on_event(self, attempt: int, event: dict[str, Any]) -> None:
        if attempt != self._attempt:
            return  # an earlier trainer process, still draining: its news is not this attempt's
        self._last_event_at = self._clock()
        if self._attempt_key != self._desired.key:
            return  # the owner left this run (or changed its settings): the trainer is on its way out
        kind = event["type"]
        fields: dict[str, Any] = {k: event[k] for k in _REPORTED if k in event}
        self.info.update(fields)
        if kind == E.STARTED:
            self.info["peer_id"] = event.get("peer_id")
            if self.state is S.STARTING:
                self.transition(S.RUNNING, "trainer reported ready")
        elif kind == E.RESUMED:
            self.info["resumed_from"] = event.get("source")
            self._base_step = int(event.get("step") or 0)
            self.info.setdefault("checkpoint_step", event.get("step") if event.get("source") == "checkpoint" else None)
        elif kind == E.PROGRESS:
            self.last_error = self.previous_error = None
            self.info["run_steps"] = max(0, int(event.get("step") or 0) - self._base_step)
        elif kind in (E.CHECKPOINT, E.STOPPED):
            step = event.get("checkpoint_step", event.get("step"))
            if step is not None:
                self.info["checkpoint_step"] = step
            if kind == E.CHECKPOINT:
                self._checkpointed = True
            if kind == E.CHECKPOINT and self._desired.paused and self._desired.after_checkpoint:
                log.info("trainer.pausing_after_checkpoint", step=step)
                self._log.note(f"checkpoint at step {step}: pausing as asked")
                self._pause_took_effect()  # wakes the loop, which stops the trainer
        elif kind == E.ERROR:
            self.last_error = str(event.get("message", ""))[:2000]
        elif kind == E.WARNING:  # e.g. a corrupt latest.pt or a checkpoint the disk refused; training goes on
            self.info["last_warning"] = str(event.get("message", ""))[:2000]
        elif kind == E.FINISHED:
            self.info["finished"] = event.get("path")
