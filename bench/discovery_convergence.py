"""Discovery convergence: N daemons on loopback, time until every one lists every other.

    python bench/discovery_convergence.py [--sizes 2 4 8] [--heartbeat 2]

For file:// and gs:// (fake-gcs-server on loopback), starts N daemons, waits until
all answer, then measures the time until every daemon lists the N-1 others.
The goal is one heartbeat + 1 s; the ratio printed is convergence / heartbeat.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.gcs_emulator import GcsEmulator
from tests.support.daemons import DaemonProcess
from tests.support.waiting import wait_until


def converge(n: int, discovery: str, root: Path, heartbeat: float) -> float:
    daemons = [DaemonProcess(root / f"d{i}", discovery, "--heartbeat", str(heartbeat)) for i in range(n)]
    try:
        for d in daemons:
            d.start()
        started = time.monotonic()
        ids = [d.status()["peer_id"] for d in daemons]

        def everyone_sees_everyone() -> bool:
            return all(len({p["peer_id"] for p in d.call("peers")} & set(ids)) == n - 1 for d in daemons)

        wait_until(everyone_sees_everyone, 120, f"{n} daemons to converge", interval=0.05)
        return time.monotonic() - started
    finally:
        for d in daemons:
            d.stop()
            d.reap()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--heartbeat", type=float, default=2.0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hmb", dir="/tmp"))
    emulator = GcsEmulator(root / "gcs").start()
    os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
    emulator.create_bucket("bench")
    try:
        print(f"heartbeat {args.heartbeat:.1f} s; goal: convergence <= heartbeat + 1 s = {args.heartbeat + 1:.1f} s")
        for n in args.sizes:
            for name, url in (("file://", (root / f"disc{n}").as_uri()), ("gs://", f"gs://bench/n{n}")):
                if name == "file://":
                    (root / f"disc{n}").mkdir()
                seconds = converge(n, url, root / f"{name[:-3]}{n}", args.heartbeat)
                print(f"N={n:<2} {name:<8} converged in {seconds:5.2f} s = {seconds / args.heartbeat:.2f} heartbeats")
    finally:
        emulator.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
