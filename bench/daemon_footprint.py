"""The daemon's own footprint: RSS and CPU % of the hivemindd process alone, idle and while supervising.

    python bench/daemon_footprint.py [--seconds 30]

Phases, each measured over ``--seconds`` from the process's own CPU times
(user + system, so other load on the machine does not count):

1. idle, not joined, in the foreground (production heartbeat: 30 s);
2. idle, not joined, as under systemd (NOTIFY_SOCKET + WATCHDOG_USEC for WatchdogSec=60, read by a fake
   manager): the notify heartbeat's cost on top of phase 1;
3. supervising a demo trainer (the run of examples/demo.toml, joined through hmctl).

Prints absolute numbers for the daemon process alone, for its helpers (the
DHT's child process and p2pd) and, in phase 3, for the trainer's process
group, plus the ratios phase 2 / phase 1 and phase 3 / phase 1 (the baseline
is phase 1, measured in the same run). Goal: under 1 % CPU when idle.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.daemons import DaemonProcess
from tests.support.systemd import FakeSystemd
from tests.support.waiting import wait_until

DEMO_SPEC = Path(__file__).resolve().parents[1] / "hivemindd" / "examples" / "demo.toml"
PRODUCTION = ("--heartbeat", "30", "--ttl", "90")  # DaemonProcess's test cadence (1 s) would inflate idle CPU


@dataclass
class Sample:
    cpu_pct: float  # of one core
    rss_mb: float  # mean over the window
    rss_max_mb: float
    pss_mb: float  # proportional set size at the end: forked children share pages that RSS counts twice


def cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def rss_mb(procs: list[psutil.Process]) -> float:
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / 2**20


def pss_mb(procs: list[psutil.Process]) -> float:
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_full_info().pss
    return total / 2**20


def measure(groups: dict[str, list[psutil.Process]], seconds: float) -> dict[str, Sample]:
    """CPU % from cpu-time deltas over the window; RSS sampled once a second."""
    start_cpu = {name: cpu_s(procs) for name, procs in groups.items()}
    rss: dict[str, list[float]] = {name: [] for name in groups}
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        for name, procs in groups.items():
            rss[name].append(rss_mb(procs))
        time.sleep(1.0)  # the sampling period of the measurement itself
    wall = time.monotonic() - start
    cpu = {name: 100 * (cpu_s(procs) - start_cpu[name]) / wall for name, procs in groups.items()}
    return {name: Sample(cpu[name], sum(rss[name]) / len(rss[name]), max(rss[name]), pss_mb(procs))
            for name, procs in groups.items()}


def helpers(daemon_pid: int, exclude_pgid: int | None = None) -> list[psutil.Process]:
    """The daemon's own children (the DHT process, p2pd), not the trainer's process group."""
    out = []
    for child in psutil.Process(daemon_pid).children(recursive=True):
        try:
            if exclude_pgid is not None and os.getpgid(child.pid) == exclude_pgid:
                continue
        except ProcessLookupError:
            continue
        out.append(child)
    return out


def show(phase: str, result: dict[str, Sample]) -> None:
    for name, s in result.items():
        print(f"{phase:<26} {name:<16} CPU {s.cpu_pct:6.2f} %   RSS mean {s.rss_mb:7.1f} MB  max {s.rss_max_mb:7.1f} MB"
              f"   PSS {s.pss_mb:7.1f} MB")


def run_daemon(root: Path, name: str, notify: FakeSystemd | None) -> DaemonProcess:
    env_backup = dict(os.environ)
    if notify is not None:
        os.environ.update(NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="60000000")
    try:
        return DaemonProcess(root / name, root / "disc", *PRODUCTION).start()
    finally:
        os.environ.clear()
        os.environ.update(env_backup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each measured window")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to let start-up work finish first")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hmfp", dir="/tmp"))
    (root / "disc").mkdir()
    print(f"cpus {psutil.cpu_count()}  load {os.getloadavg()[0]:.2f}  window {args.seconds:.0f} s")

    daemon = run_daemon(root, "plain", None)
    try:
        assert daemon.proc is not None
        time.sleep(args.settle)  # let start-up work (imports, first discovery round) finish before measuring
        main_proc = psutil.Process(daemon.proc.pid)
        idle = measure({"daemon": [main_proc], "dht+p2pd": helpers(main_proc.pid)}, args.seconds)
        show("idle (foreground)", idle)
    finally:
        daemon.stop()
        daemon.reap()

    fake = FakeSystemd(str(root / "sd_notify.sock"))
    daemon = run_daemon(root, "notify", fake)
    try:
        assert daemon.proc is not None
        time.sleep(args.settle)
        main_proc = psutil.Process(daemon.proc.pid)
        idle_sd = measure({"daemon": [main_proc], "dht+p2pd": helpers(main_proc.pid)}, args.seconds)
        show("idle (systemd notify)", idle_sd)
        print(f"{'':<26} notifications received: {len(fake.snapshot())} "
              f"(READY, STATUS on change, WATCHDOG every 30 s)")

        joined = daemon.hmctl("join", "--run-id", "demo", "--spec", str(DEMO_SPEC))
        if joined.returncode != 0:
            raise SystemExit(f"join failed: {joined.stderr}")
        wait_until(lambda: daemon.trainer().get("step") is not None, 300, "the demo trainer's first step", interval=1.0)
        time.sleep(args.settle)
        pgid = int(daemon.trainer()["pid"])  # the trainer leads its own process group
        trainer_procs = [p for p in psutil.process_iter() if _pgid(p.pid) == pgid]
        busy = measure({"daemon": [main_proc], "dht+p2pd": helpers(main_proc.pid, exclude_pgid=pgid),
                        "trainer (group)": trainer_procs}, args.seconds)
        show("supervising demo trainer", busy)
        status = daemon.status()["trainer"]
        print(f"{'':<26} trainer step {status.get('step')}  epoch {status.get('epoch')}  "
              f"samples/s {status.get('samples_per_s')}")
    finally:
        daemon.stop(timeout=200)
        daemon.reap()
        fake.close()

    base = idle["daemon"].cpu_pct
    print()
    print(f"daemon CPU idle: {base:.2f} % of one core (goal < 1 %): {'OK' if base < 1 else 'ABOVE GOAL'}")
    print(f"daemon RSS idle: {idle['daemon'].rss_mb:.0f} MB, PSS {idle['daemon'].pss_mb:.0f} MB "
          f"(+ DHT child and p2pd: RSS {idle['dht+p2pd'].rss_mb:.0f} MB, PSS {idle['dht+p2pd'].pss_mb:.0f} MB)")
    if base > 0:
        print(f"ratio systemd-notify idle / foreground idle (daemon CPU): {idle_sd['daemon'].cpu_pct / base:.2f}x")
        print(f"ratio supervising / idle (daemon CPU): {busy['daemon'].cpu_pct / base:.2f}x")
    print(f"daemon RSS supervising: {busy['daemon'].rss_mb:.0f} MB (trainer group {busy['trainer (group)'].rss_mb:.0f} MB)")


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


if __name__ == "__main__":
    main()
