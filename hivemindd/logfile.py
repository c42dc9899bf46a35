"""The trainer's log: lines appended to a size-rotated file, plus a numbered tail in memory
so ``hmctl logs -f`` can ask for "everything after line N"."""

from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path


class TrainerLog:
    """Append-only log with rotation (``trainer.log`` → ``.1`` … ``.keep``)."""

    def __init__(self, path: Path, max_bytes: int = 10 << 20, keep: int = 3, memory_lines: int = 2000) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._recent: deque[tuple[int, str]] = deque(maxlen=memory_lines)
        self._seq = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held for the daemon's life

    @property
    def seq(self) -> int:
        """Number of the last line written by this daemon."""
        return self._seq

    def write(self, line: str) -> None:
        self._seq += 1
        self._recent.append((self._seq, line))
        self._file.write(line + "\n")
        self._file.flush()
        if self._file.tell() > self.max_bytes:
            self._rotate()

    def note(self, message: str) -> None:
        """A line from the daemon itself, so the log tells the whole story of restarts."""
        self.write(f"[hivemindd {time.strftime('%Y-%m-%d %H:%M:%S')}] {message}")

    def after(self, seq: int, limit: int) -> list[tuple[int, str]]:
        return [item for item in self._recent if item[0] > seq][:limit]

    def tail(self, n: int) -> list[str]:
        """The last ``n`` lines, from the file (so they survive daemon restarts)."""
        lines: list[str] = []
        for path in [self.path] + [self._rotated(i) for i in range(1, self.keep + 1)]:
            if len(lines) >= n:
                break
            lines = _tail_of(path, n - len(lines)) + lines
        return lines[-n:]

    def close(self) -> None:
        self._file.close()

    def _rotated(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{i}")

    def _rotate(self) -> None:
        self._file.close()
        for i in range(self.keep - 1, 0, -1):
            if self._rotated(i).exists():
                os.replace(self._rotated(i), self._rotated(i + 1))
        os.replace(self.path, self._rotated(1))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115


def _tail_of(path: Path, n: int, chunk: int = 64 * 1024) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            data = b""
            while end > 0 and data.count(b"\n") <= n:
                start = max(0, end - chunk)
                f.seek(start)
                data = f.read(end - start) + data
                end = start
    except FileNotFoundError:
        return []
    return data.decode(errors="replace").splitlines()[-n:]
