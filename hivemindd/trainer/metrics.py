"""Per-host metrics files of a run: ``<work_dir>/stats/<hostname>/``.

Rows are appended and flushed as they happen; a restarted trainer appends to the
same files (the header is written only when a file is new or empty), so one file
holds the host's whole history of the run. The dashboard and people with
spreadsheets read these columns by name; keep them stable.

``training_metrics.csv``, one row per local optimizer step:
    timestamp        Unix time (seconds, UTC) when the step finished
    step             this host's local optimizer step (batches trained here, over restarts)
    hivemind_epoch   global optimizer steps of the swarm (one per target_batch_size samples)
    dataset_epoch    passes over data.train_samples by the whole swarm, fractional
    loss             cross-entropy of this step's batch
    train_top1       top-1 accuracy of this step's batch (0..1)
    lr               learning rate in effect for this step
    samples_per_s    this host's training throughput over the last few seconds

``validation_metrics.csv``, one row per validation pass:
    timestamp, step, hivemind_epoch   as above
    val_loss         mean cross-entropy over the validated samples
    val_top1         top-1 accuracy (0..1)
    val_top5         top-5 accuracy (0..1; = top-k with k = num_classes when fewer than 5 classes)
    samples          images validated

``system_stats.csv``, one row every few seconds:
    timestamp
    cpu_percent      whole machine, since the previous row
    mem_percent      whole machine
    mem_used_gb      whole machine (GiB)
    net_sent_mb      MiB sent by the machine since the previous row
    net_recv_mb      MiB received since the previous row
    gpu_util_percent this trainer's GPU, when training on CUDA and NVML answers; else empty
    gpu_mem_used_gb  memory in use on that GPU (GiB), when training on CUDA; else empty

``parameters.json`` (rewritten at every trainer start): the run spec, the host
settings, versions (python, torch, torchvision, hivemind, hivemindd), the device
and precision, hostname, pid and start time.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import json
import logging
import os
import platform
import socket
import threading
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import psutil

log = logging.getLogger(__name__)

TRAINING_COLUMNS = ("timestamp", "step", "hivemind_epoch", "dataset_epoch", "loss", "train_top1", "lr", "samples_per_s")
VALIDATION_COLUMNS = ("timestamp", "step", "hivemind_epoch", "val_loss", "val_top1", "val_top5", "samples")
SYSTEM_COLUMNS = ("timestamp", "cpu_percent", "mem_percent", "mem_used_gb", "net_sent_mb", "net_recv_mb",
                  "gpu_util_percent", "gpu_mem_used_gb")
SYSTEM_INTERVAL_S = 5.0
_GB = 1 << 30
_MB = 1 << 20


def stats_dir(work_dir: str | Path, hostname: str | None = None) -> Path:
    return Path(work_dir) / "stats" / (hostname or socket.gethostname())


class CsvLog:
    """An append-only CSV file with a fixed header; every row is flushed at once.

    A file that exists with another header (an older version of these columns) is
    left alone: it is renamed aside with a numbered suffix and a new file started.
    Write errors (a full disk) are logged once and the rows dropped: metrics must
    never stop training.
    """

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path = path
        self.columns = tuple(columns)
        self._lock = threading.Lock()
        self._failed = False
        path.parent.mkdir(parents=True, exist_ok=True)
        self._set_aside_if_foreign()
        self._file: IO[str] = open(path, "a", newline="", encoding="utf-8")  # noqa: SIM115  # closed by close()
        self._writer = csv.writer(self._file)
        if self._file.tell() == 0:
            self._write(self.columns)

    def _set_aside_if_foreign(self) -> None:
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return
        with open(self.path, newline="", encoding="utf-8", errors="replace") as f:
            header = next(csv.reader(f), [])
        if tuple(header) == self.columns:
            return
        n = 1
        while (aside := self.path.with_name(f"{self.path.name}.{n}")).exists():
            n += 1
        log.warning("%s has other columns (%s); moved it to %s", self.path, ",".join(header), aside.name)
        os.replace(self.path, aside)

    def row(self, values: Sequence[Any]) -> None:
        if len(values) != len(self.columns):
            raise ValueError(f"{self.path.name}: {len(values)} values for {len(self.columns)} columns")
        self._write([_cell(v) for v in values])

    def _write(self, cells: Sequence[Any]) -> None:
        with self._lock:
            if self._file.closed:
                return
            try:
                self._writer.writerow(cells)
                self._file.flush()
                self._failed = False
            except OSError as exc:
                if not self._failed:
                    log.warning("cannot write %s (%s); dropping rows until it works again", self.path, exc.strerror)
                self._failed = True

    def close(self) -> None:
        with self._lock, contextlib.suppress(OSError):
            self._file.close()


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        # six significant digits, but timestamps (and other big numbers) to the millisecond
        return f"{value:.6g}" if abs(value) < 1e5 else f"{value:.3f}"
    return value


class RateMeter:
    """Samples per second over the last ``window_s`` seconds (at least two steps)."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._marks: collections.deque[tuple[float, int]] = collections.deque()
        self._total = 0

    def add(self, samples: int, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._total += samples
        self._marks.append((now, self._total))
        while len(self._marks) > 2 and now - self._marks[1][0] >= self.window_s:
            self._marks.popleft()
        (t0, n0), (t1, n1) = self._marks[0], self._marks[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


class SystemStats:
    """A thread that appends a ``system_stats.csv`` row every ``interval_s`` (and one at start)."""

    def __init__(self, path: Path, gpu_index: int | None = None, interval_s: float = SYSTEM_INTERVAL_S) -> None:
        self._csv = CsvLog(path, SYSTEM_COLUMNS)
        self._gpu_index = gpu_index
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="system-stats", daemon=True)
        self._last_net = psutil.net_io_counters()
        psutil.cpu_percent(interval=None)  # starts the measuring interval

    def start(self) -> SystemStats:
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                self._csv.row(self.sample())
            except Exception as exc:  # a stats hiccup must never matter to training
                log.warning("system stats failed: %s", exc)
            if self._stop.wait(self._interval_s):
                return

    def sample(self) -> list[Any]:
        mem = psutil.virtual_memory()
        net = psutil.net_io_counters()
        sent = (net.bytes_sent - self._last_net.bytes_sent) / _MB
        recv = (net.bytes_recv - self._last_net.bytes_recv) / _MB
        self._last_net = net
        gpu_util, gpu_mem = self._gpu()
        return [round(time.time(), 3), psutil.cpu_percent(interval=None), mem.percent, mem.used / _GB,
                sent, recv, gpu_util, gpu_mem]

    def _gpu(self) -> tuple[float | None, float | None]:
        if self._gpu_index is None:
            return None, None
        import torch

        util: float | None = None
        with contextlib.suppress(Exception):  # needs NVML (pynvml); absent on many installs
            util = float(torch.cuda.utilization(self._gpu_index))
        free, total = torch.cuda.mem_get_info(self._gpu_index)
        return util, (total - free) / _GB

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self._csv.close()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("torch", "torchvision", "hivemind", "hivemindd", "webdataset"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "unknown"
    return out


def write_parameters(directory: Path, spec: dict[str, Any], host: dict[str, Any], run_id: str,
                     device: dict[str, Any]) -> Path:
    """``parameters.json``: what this trainer runs with, written atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    document = {
        "run_id": run_id,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": round(time.time(), 3),
        "spec": spec,
        "host": host,
        "device": device,
        "versions": versions(),
    }
    path = directory / "parameters.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


class RunMetrics:
    """The three CSV files of one trainer process; ``close()`` stops the system stats thread."""

    def __init__(self, directory: Path, gpu_index: int | None = None,
                 system_interval_s: float = SYSTEM_INTERVAL_S) -> None:
        self.directory = directory
        self.training = CsvLog(directory / "training_metrics.csv", TRAINING_COLUMNS)
        self.validation = CsvLog(directory / "validation_metrics.csv", VALIDATION_COLUMNS)
        self.system = SystemStats(directory / "system_stats.csv", gpu_index, system_interval_s).start()
        self.rate = RateMeter()

    def train_step(self, step: int, hivemind_epoch: int, dataset_epoch: float, loss: float, top1: float,
                   lr: float, samples: int) -> None:
        rate = self.rate.add(samples)
        self.training.row([round(time.time(), 3), step, hivemind_epoch, dataset_epoch, loss, top1, lr, rate])

    def validated(self, step: int, hivemind_epoch: int, loss: float, top1: float, top5: float, samples: int) -> None:
        self.validation.row([round(time.time(), 3), step, hivemind_epoch, loss, top1, top5, samples])

    def close(self) -> None:
        self.system.stop()
        self.training.close()
        self.validation.close()
