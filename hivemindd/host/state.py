"""Desired state: what the owner asked this host to do, persisted in state.json (written atomically)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hivemindd.host.statedir import StateError, write_atomic
from hivemindd.wire.launch import HostSettings
from hivemindd.wire.protocol import check_run_id

STATE_VERSION = 1


def utc_iso(timestamp: float) -> str:
    """A wall-clock instant as ISO 8601 UTC (``2025-01-31T14:05:00Z``): what state.json and the API carry."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_utc_iso(text: str) -> float:
    """The inverse of ``utc_iso``; a time without a zone is refused rather than guessed."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone (expected like 2025-01-31T14:05:00Z)")
    return moment.timestamp()


@dataclass(frozen=True)
class DesiredState:
    """What this host's owner asked for; the reconciler makes it so.

    A pause may be timed (``pause_until``: an absolute wall-clock time, so it means the
    same after a reboot, and a deadline that passed while the daemon was down has
    simply passed) and may wait for the trainer's next checkpoint first
    (``pause_after_checkpoint``, cleared once the pause took effect).
    """

    run_id: str | None = None
    host: HostSettings = field(default_factory=HostSettings)
    paused: bool = False
    pause_until: float | None = None
    pause_after_checkpoint: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "run_id": self.run_id, "host": self.host.to_dict(), "paused": self.paused,
                "pause_until": None if self.pause_until is None else utc_iso(self.pause_until),
                "pause_after_checkpoint": self.pause_after_checkpoint}

    def joined(self, run_id: str, host: HostSettings) -> DesiredState:
        return replace(self, run_id=run_id, host=host, paused=False, pause_until=None, pause_after_checkpoint=False)

    def left(self) -> DesiredState:
        return replace(self, run_id=None, paused=False, pause_until=None, pause_after_checkpoint=False)

    def with_paused(self, paused: bool, until: float | None = None, after_checkpoint: bool = False) -> DesiredState:
        """Pause (indefinitely, or until the wall-clock time ``until``) or end any pause."""
        if not paused:
            return replace(self, paused=False, pause_until=None, pause_after_checkpoint=False)
        return replace(self, paused=True, pause_until=until, pause_after_checkpoint=after_checkpoint)

    def pause_took_effect(self) -> DesiredState:
        """The trainer reached its checkpoint (or was not running): the pause is now a plain one."""
        return replace(self, pause_after_checkpoint=False)

    def pause_status(self, now: float) -> dict[str, Any] | None:
        """The pause in force for the API (None: not paused): until when, and whether it waits for a checkpoint."""
        if not self.paused:
            return None
        until = self.pause_until
        return {
            "until": None if until is None else utc_iso(until),
            "remaining_s": None if until is None else round(max(0.0, until - now), 1),
            "after_checkpoint": self.pause_after_checkpoint,
        }


def load_state(path: Path) -> DesiredState:
    """Read state.json; a missing file is the empty state, a bad one a StateError."""
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return DesiredState()
    except (OSError, ValueError) as exc:
        raise StateError(f"{path}: cannot read desired state ({exc}); fix or move the file away and restart") from None
    try:
        if not isinstance(raw, dict):
            raise TypeError("not a JSON object")
        run_id = raw.get("run_id")
        if run_id is not None and check_run_id(run_id):
            raise ValueError(f"run_id {check_run_id(run_id)}")
        host = HostSettings.from_dict(raw.get("host") or {})
        if host.problems():
            raise ValueError("; ".join(f"host.{k} {m}" for k, m in host.problems()))
        paused = raw.get("paused", False)
        if not isinstance(paused, bool):
            raise TypeError("paused must be true or false")
        until = raw.get("pause_until")
        if until is not None:
            if not isinstance(until, str):
                raise TypeError("pause_until must be an ISO 8601 UTC time or null")
            until = parse_utc_iso(until)
            if not math.isfinite(until):
                raise ValueError("pause_until is not a finite time")
        after = raw.get("pause_after_checkpoint", False)
        if not isinstance(after, bool):
            raise TypeError("pause_after_checkpoint must be true or false")
        if not paused:
            until, after = None, False  # leftovers of an ended pause mean nothing
        return DesiredState(run_id=run_id, host=host, paused=paused, pause_until=until, pause_after_checkpoint=after)
    except (TypeError, ValueError) as exc:
        raise StateError(f"{path}: bad desired state: {exc}; fix or move the file away and restart") from None


def save_state(path: Path, state: DesiredState) -> None:
    write_atomic(path, (json.dumps(state.to_dict(), indent=2) + "\n").encode(), mode=0o600)
