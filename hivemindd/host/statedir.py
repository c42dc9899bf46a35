"""The state directory: where each file lives, how files are written (atomically), the HTTP token.

Everything a daemon keeps lies under one folder (``--state-dir``), made 0700: the
desired state, keys, logs, run folders with their checkpoints, the caches.
"""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path


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

    def make_root(self) -> None:
        """Create the state directory 0700, and tighten one that exists: mkdir's mode applies only to new folders."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        mode = stat.S_IMODE(self.root.stat().st_mode)
        if mode & 0o077:
            try:
                os.chmod(self.root, mode & ~0o077)
            except OSError as exc:
                raise StateError(f"{self.root} is open to other users (mode {mode:o}) and cannot be made private: "
                                 f"{exc.strerror}; run `chmod 700 {self.root}` or pass another --state-dir") from None

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

    @property
    def http_token(self) -> Path:
        return self.root / "http.token"

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def run_spec(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "spec.json"


def load_or_create_token(path: Path) -> str:
    """The bearer token of the TCP listener: made once (0600), then the same across restarts."""
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = ""
    if len(token) < 32:  # missing, emptied or hand-edited into something guessable: make a new one
        token = secrets.token_urlsafe(32)
        write_atomic(path, (token + "\n").encode(), mode=0o600)
    elif path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)  # a token others can read is no secret
    return token
