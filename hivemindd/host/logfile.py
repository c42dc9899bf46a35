"""The trainer's log: lines appended to a size-rotated file, plus a numbered tail in memory
so ``hmctl logs -f`` can ask for "everything after line N"; and the daemon's own log
lines, kept in a bounded ring (they also go to stderr, i.e. the journal) so the API can
serve both.

Every line hivemindd writes starts with one timestamp format, ISO 8601 in UTC with
milliseconds (``2025-01-31T14:05:00.123Z``, see ``iso_time``): the daemon's lines,
its notes in the trainer log, the trainer's own lines and hivemind's (routed through
the same handlers by ``route_hivemind_logs``).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, NamedTuple

from hivemindd.wire.logformat import iso_time

# Leading timestamps of log lines: ours ("2025-01-31T14:05:00.123Z"), and in logs written by older versions the
# trainer's logging asctime ("2025-01-31 14:05:00,123") and the daemon's notes ("[hivemindd 2025-01-31 14:05:00]").
_LINE_TIME = re.compile(r"^(?:\[hivemindd )?(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d)(?:[.,](\d+))?(Z)?")
_HIVEMIND_TIME = re.compile(r"^([A-Z][a-z]{2} +\d{1,2} \d\d:\d\d:\d\d)(?:\.(\d+))? ")  # "Nov 21 19:51:14.423 [INFO]"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class LogLine(NamedTuple):
    """One numbered line of a log and when it was written (unix time)."""

    seq: int
    time: float
    line: str


def line_time(line: str) -> float | None:
    """The unix time a log line starts with, or None (a traceback line, a stray print)."""
    match = _LINE_TIME.match(line)
    if match is None:
        return _hivemind_time(line)
    try:
        moment = datetime.fromisoformat(match.group(1).replace(" ", "T"))
    except ValueError:
        return None
    fraction = float("0." + match.group(2)) if match.group(2) else 0.0
    if match.group(3):  # structlog's ISO stamps are UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp() + fraction  # naive: this machine's local time, as logging writes it


def _hivemind_time(line: str) -> float | None:
    """hivemind's own log format has no year: take this one (or last year's, for a line from the future)."""
    match = _HIVEMIND_TIME.match(line)
    if match is None:
        return None
    now = datetime.now()
    try:
        moment = datetime.strptime(f"{now.year} {match.group(1)}", "%Y %b %d %H:%M:%S")
    except ValueError:
        return None
    if moment > now.replace(microsecond=0) and moment.month > now.month:
        moment = moment.replace(year=now.year - 1)
    return moment.timestamp() + (float("0." + match.group(2)) if match.group(2) else 0.0)


def timed(lines: Iterable[str], default: float | None = None) -> list[tuple[float, str]]:
    """Attach a time to each line: its own, else the previous line's (so a traceback stays with its cause).

    Lines before the first one with a time get that first time (``default`` or now when no line has one).
    """
    lines = list(lines)
    found = [line_time(line) for line in lines]
    first = next((t for t in found if t is not None), time.time() if default is None else default)
    out = []
    last = first
    for moment, line in zip(found, lines, strict=True):
        last = moment if moment is not None else last
        out.append((last, line))
    return out


class TrainerLog:
    """Append-only log with rotation (``trainer.log`` → ``.1`` … ``.keep``)."""

    def __init__(self, path: Path, max_bytes: int = 10 << 20, keep: int = 3, memory_lines: int = 2000) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._recent: deque[LogLine] = deque(maxlen=memory_lines)
        self._seq = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held for the daemon's life

    @property
    def seq(self) -> int:
        """Number of the last line written by this daemon."""
        return self._seq

    def write(self, line: str) -> None:
        self._seq += 1
        self._recent.append(LogLine(self._seq, time.time(), line))
        self._file.write(line + "\n")
        self._file.flush()
        if self._file.tell() > self.max_bytes:
            self._rotate()

    def note(self, message: str) -> None:
        """A line from the daemon itself, so the log tells the whole story of restarts."""
        self.write(f"{iso_time()} [hivemindd] {message}")

    def after(self, seq: int, limit: int) -> list[tuple[int, str]]:
        return [(item.seq, item.line) for item in self.after_timed(seq, limit)]

    def after_timed(self, seq: int, limit: int) -> list[LogLine]:
        """Lines after ``seq`` that this daemon wrote, with the time each arrived."""
        return [item for item in self._recent if item.seq > seq][:limit]

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


class DaemonLogRing:
    """A write-only text stream for structlog that copies every line to ``sink`` (stderr) and keeps the
    last ``capacity`` lines numbered in memory, so ``hmctl logs --daemon`` works without the journal."""

    def __init__(self, sink: IO[str] | None = None, capacity: int = 5000) -> None:
        self._sink = sink if sink is not None else sys.stderr
        self._lines: deque[LogLine] = deque(maxlen=capacity)
        self._seq = 0
        self._partial = ""
        self._lock = threading.Lock()  # hivemind and aiohttp may log from other threads

    @property
    def seq(self) -> int:
        return self._seq

    def write(self, text: str) -> int:
        with contextlib.suppress(OSError, ValueError):  # a closed stderr must not stop the ring (or the daemon)
            self._sink.write(text)
        with self._lock:
            self._partial += text
            *whole, self._partial = self._partial.split("\n")
            now = time.time()
            for line in whole:
                self._seq += 1
                self._lines.append(LogLine(self._seq, now, _ANSI.sub("", line)))
        return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._sink.flush()

    def isatty(self) -> bool:
        return bool(getattr(self._sink, "isatty", lambda: False)())

    def after(self, seq: int, limit: int) -> list[LogLine]:
        with self._lock:
            return [item for item in self._lines if item.seq > seq][:limit]

    def tail(self, n: int) -> list[LogLine]:
        with self._lock:
            return list(self._lines)[-n:]

    def __getattr__(self, name: str) -> Any:  # encoding, fileno … as the sink has them
        return getattr(self._sink, name)
