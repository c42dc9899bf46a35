"""Desired state (what the owner asked for), the state directory layout, atomic files."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hivemindd.launch import HostSettings
from hivemindd.protocol import check_run_id

STATE_VERSION = 1


class StateError(RuntimeError):
    """state.json exists but cannot be used; the message says which file and why."""


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` so that ``path`` holds either the old bytes or the new, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass(frozen=True)
class StatePaths:
    """Where everything lives under one state directory."""

    root: Path

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def identity(self) -> Path:
        return self.root / "identity.key"

    @property
    def lock(self) -> Path:
        return self.root / "hivemindd.lock"

    @property
    def pid_file(self) -> Path:
        return self.root / "trainer.pid"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def trainer_log(self) -> Path:
        return self.logs / "trainer.log"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def run_spec(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "spec.json"


@dataclass(frozen=True)
class DesiredState:
    """What this host's owner asked for; the reconciler makes it so."""

    run_id: str | None = None
    host: HostSettings = field(default_factory=HostSettings)
    paused: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "run_id": self.run_id, "host": self.host.to_dict(), "paused": self.paused}

    def joined(self, run_id: str, host: HostSettings) -> DesiredState:
        return replace(self, run_id=run_id, host=host, paused=False)

    def left(self) -> DesiredState:
        return replace(self, run_id=None, paused=False)

    def with_paused(self, paused: bool) -> DesiredState:
        return replace(self, paused=paused)


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
        return DesiredState(run_id=run_id, host=host, paused=paused)
    except (TypeError, ValueError) as exc:
        raise StateError(f"{path}: bad desired state: {exc}; fix or move the file away and restart") from None


def save_state(path: Path, state: DesiredState) -> None:
    write_atomic(path, (json.dumps(state.to_dict(), indent=2) + "\n").encode(), mode=0o600)
