"""When a failed trainer is started again: exponential backoff with jitter, and crashloop.

1 s, 2 s, 4 s … capped, reset after a stable run; too many failures that went
nowhere within a window park the trainer in ``crashloop`` for a cooldown. The
supervisor asks; the clock and the randomness are passed in, so tests need no sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RestartPolicy:
    """How quickly to restart a failed trainer, and when to stop trying for a while."""

    base_delay_s: float = 1.0
    max_delay_s: float = 60.0
    jitter: float = 0.1  # ± this fraction, so a swarm that crashed together does not restart in lockstep
    stable_after_s: float = 60.0  # a run this long resets the failure count
    crashloop_failures: int = 5
    crashloop_window_s: float = 300.0
    crashloop_cooldown_s: float = 300.0

    def delay(self, consecutive_failures: int, rand: float) -> float:
        """Backoff before restart number ``consecutive_failures`` (1, 2, 4 … capped), jittered."""
        raw = min(self.max_delay_s, self.base_delay_s * 2 ** max(0, consecutive_failures - 1))
        return raw * (1 + self.jitter * (2 * rand - 1))


@dataclass
class RestartTracker:
    """Counts failures against the policy; the clock is injected so tests need no sleeping."""

    policy: RestartPolicy
    consecutive: int = 0
    failures: list[float] = field(default_factory=list)

    def record_exit(self, started_at: float, now: float, rand: float, progressed: bool = False,
                    trained: bool = False) -> tuple[bool, float]:
        """After an unexpected exit: (crashloop?, seconds to wait before the next start).

        ``progressed``: the run wrote a checkpoint. A trainer that keeps dying but keeps
        saving progress (the OOM killer, a flaky host) is getting somewhere: it restarts
        at once every time and never counts towards crashloop, which is for going nowhere.
        ``trained``: the run took training steps but saved none. It is not going nowhere
        either (it got past every start-up failure), so it does not count towards
        crashloop, but its backoff still grows: a trainer that dies after a few steps
        every time is restarted at the capped delay, never in a busy loop.
        """
        if progressed or now - started_at >= self.policy.stable_after_s:
            self.reset()
        self.consecutive += 1
        self.failures = [t for t in self.failures if now - t < self.policy.crashloop_window_s]
        if not trained:
            self.failures.append(now)
        if len(self.failures) >= self.policy.crashloop_failures:
            return True, self.policy.crashloop_cooldown_s
        return False, self.policy.delay(self.consecutive, rand)

    def reset(self) -> None:
        self.consecutive = 0
        self.failures = []
