"""How fast `hmctl status` answers, against the floor of starting Python at all.

    python bench/hmctl_status.py [--runs 30]

Prints median and p90 wall times of `python3 -c pass` and of `hmctl status`
against a live daemon, and their ratio (goal: <= 4x).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.daemons import DaemonProcess


def timed(cmd: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        out.append(time.perf_counter() - start)
    return out


def report(name: str, times: list[float]) -> float:
    med = statistics.median(times)
    p90 = sorted(times)[int(0.9 * (len(times) - 1))]
    print(f"{name:<28} median {med * 1000:7.1f} ms   p90 {p90 * 1000:7.1f} ms")
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hmb", dir="/tmp"))
    daemon = DaemonProcess(root / "d", root / "disc")
    (root / "disc").mkdir()
    daemon.start()
    try:
        hmctl = str(Path(sys.executable).with_name("hmctl"))
        base = report("python3 -c pass", timed([sys.executable, "-c", "pass"], args.runs))
        status = report("hmctl status", timed([hmctl, "--socket", str(daemon.client.socket_path), "status"], args.runs))
        report("hmctl status --json", timed([hmctl, "--socket", str(daemon.client.socket_path), "status", "--json"],
                                            args.runs))
        print(f"ratio hmctl status / python startup: {status / base:.2f}x (goal <= 4x)")
    finally:
        daemon.stop()
        daemon.reap()


if __name__ == "__main__":
    main()
