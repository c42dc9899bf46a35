"""This host's metrics over time, read from the trainer's CSV files (``<run>/stats/<hostname>/``).

The trainer appends rows (see ``hivemindd/trainer/metrics.py`` for the columns); the
daemon only reads them, so the history survives trainer and daemon restarts. Files
are read incrementally: each poll parses only the bytes appended since the last one,
and answers are columnar (one list per column, the shape uPlot draws) and thinned to
at most ``max_points`` rows so a long run's page stays light.
"""

from __future__ import annotations

import csv
import io
import json
import math
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The files the dashboard draws, by the key it uses for them.
FILES = {"training": "training_metrics.csv", "validation": "validation_metrics.csv", "system": "system_stats.csv"}
MAX_POINTS = 1500


@dataclass
class _Columns:
    """The parsed rows of one CSV file so far, one float array per column (nan for an empty cell)."""

    header: list[str] = field(default_factory=list)
    values: list[array[float]] = field(default_factory=list)
    offset: int = 0  # bytes consumed (whole lines only)
    inode: int = -1

    @property
    def rows(self) -> int:
        return len(self.values[0]) if self.values else 0


class CsvColumns:
    """Incremental reader of one append-only CSV file with a header row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cols = _Columns()

    def refresh(self) -> _Columns:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._cols = _Columns()
            return self._cols
        if stat.st_ino != self._cols.inode or stat.st_size < self._cols.offset:
            self._cols = _Columns(inode=stat.st_ino)  # replaced or set aside (other columns): start over
        if stat.st_size == self._cols.offset:
            return self._cols
        with open(self.path, "rb") as f:
            f.seek(self._cols.offset)
            chunk = f.read(stat.st_size - self._cols.offset)
        end = chunk.rfind(b"\n") + 1  # a row being written right now waits for the next poll
        if end == 0:
            return self._cols
        self._cols.offset += end
        rows = csv.reader(io.StringIO(chunk[:end].decode("utf-8", errors="replace")))
        for row in rows:
            if not self._cols.header:
                self._cols.header = row
                self._cols.values = [array("d") for _ in row]
                continue
            if len(row) != len(self._cols.header):
                continue  # a torn or foreign row: skip it rather than shift every column
            for column, cell in zip(self._cols.values, row, strict=True):
                column.append(_number(cell))
        return self._cols

    def columns(self, since: float | None, max_points: int, after_row: int = 0) -> dict[str, list[float | None]]:
        """Rows past ``after_row`` with ``timestamp`` > ``since``, thinned evenly to ``max_points`` (the newest kept)."""
        cols = self.refresh()
        if not cols.header or "timestamp" not in cols.header:
            return {}
        times = cols.values[cols.header.index("timestamp")]
        start = min(after_row, len(times))
        if since is not None:
            start = max(start, _first_after(times, since))
        count = len(times) - start
        stride = max(1, math.ceil(count / max_points))
        # Count back from the newest row so the last point drawn is always the latest one.
        picked = range(len(times) - 1, start - 1, -stride)
        order = list(reversed(picked))
        return {name: [_json_number(values[i]) for i in order] for name, values in zip(cols.header, cols.values,
                                                                                          strict=True)}

    def last(self) -> dict[str, float | None]:
        cols = self.refresh()
        if not cols.rows:
            return {}
        return {name: _json_number(values[-1]) for name, values in zip(cols.header, cols.values, strict=True)}

    def maximum(self, column: str) -> float | None:
        cols = self.refresh()
        if column not in cols.header:
            return None
        finite = [v for v in cols.values[cols.header.index(column)] if math.isfinite(v)]
        return max(finite) if finite else None


def _first_after(times: array[float], since: float) -> int:
    lo, hi = 0, len(times)
    while lo < hi:  # timestamps only grow (one writer appends), so bisect
        mid = (lo + hi) // 2
        if times[mid] <= since:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _number(cell: str) -> float:
    try:
        return float(cell)
    except ValueError:
        return math.nan


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


class RunHistory:
    """The three metric files of one host in one run, plus its parameters.json."""

    def __init__(self, stats_dir: Path) -> None:
        self.stats_dir = stats_dir
        self.files = {key: CsvColumns(stats_dir / name) for key, name in FILES.items()}

    def snapshot(self, since: float | None = None, cursor: tuple[int, ...] | None = None,
                 max_points: int = MAX_POINTS) -> dict[str, Any]:
        """Columns of each file; ``cursor`` (rows already sent, per file, from the last answer) sends only new rows.

        Polling by row cursor rather than by time keeps working when rows share a timestamp.
        """
        rows = cursor or (0,) * len(self.files)
        out: dict[str, Any] = {key: reader.columns(since, max_points, after)
                               for (key, reader), after in zip(self.files.items(), rows, strict=True)}
        out["cursor"] = ".".join(str(reader.refresh().rows) for reader in self.files.values())
        out["parameters"] = self.parameters()
        return out

    def parameters(self) -> dict[str, Any] | None:
        try:
            document = json.loads((self.stats_dir / "parameters.json").read_bytes())
        except (OSError, ValueError):
            return None
        return document if isinstance(document, dict) else None

    def latest_validation(self) -> dict[str, float | None]:
        """The last validation row, plus ``best_top1`` over all of them."""
        reader = self.files["validation"]
        last = reader.last()
        if last:
            last["best_top1"] = reader.maximum("val_top1")
        return last


class HistoryCache:
    """One RunHistory per stats directory, kept so repeated polls read only new bytes."""

    def __init__(self) -> None:
        self._by_dir: dict[Path, RunHistory] = {}

    def get(self, stats_dir: Path) -> RunHistory:
        if stats_dir not in self._by_dir:
            if len(self._by_dir) > 16:  # runs left long ago
                self._by_dir.clear()
            self._by_dir[stats_dir] = RunHistory(stats_dir)
        return self._by_dir[stats_dir]
