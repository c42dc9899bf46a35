"""A host that joins a run already under way: seconds until it trains in the same swarm.

    python bench/late_joiner.py [--head-start 5]

Daemon A creates a tiny run and trains alone until global step ``--head-start``.
Then daemon B starts (knowing nobody: not in a run, it reads only the host list),
joins by run id and is measured: join -> first local step, join -> both trainers
accumulate from 2 peers, join -> B's global step reaches A's step at join time.
The baseline in the same run is A's own cold start (join -> first local step),
under the same load (two daemons, two trainers on this machine's cores).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.daemons import DaemonProcess
from tests.support.specs import spec_toml
from tests.support.waiting import wait_until


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--head-start", type=int, default=5, help="global steps A trains alone first")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hmb", dir="/tmp"))
    (root / "disc").mkdir()
    a, b = DaemonProcess(root / "a", root / "disc"), DaemonProcess(root / "b", root / "disc")
    join = {"spec_toml": spec_toml(), "device": "cpu", "batch_size": 16}
    try:
        a.start()
        t0 = time.monotonic()
        a.call("join", {"run_id": "late", **join})
        wait_until(lambda: (a.trainer().get("step") or 0) >= 1, 600, "A's first step", interval=0.05)
        cold = time.monotonic() - t0
        wait_until(lambda: (a.trainer().get("epoch") or 0) >= args.head_start, 900,
                   f"A at global step {args.head_start}", interval=0.2)
        b.start()
        joined_at = time.monotonic()
        b.call("join", {"run_id": "late", **{k: v for k, v in join.items() if k != "spec_toml"}})
        target = a.trainer()["epoch"]
        wait_until(lambda: (b.trainer().get("step") or 0) >= 1, 600, "B's first step", interval=0.05)
        first_step = time.monotonic() - joined_at
        wait_until(lambda: a.trainer().get("swarm_peers") == 2 and b.trainer().get("swarm_peers") == 2, 600,
                   "both trainers with 2 peers", interval=0.1)
        together = time.monotonic() - joined_at
        wait_until(lambda: (b.trainer().get("epoch") or 0) >= target, 600, "B at A's global step", interval=0.1)
        caught_up = time.monotonic() - joined_at
        print("load: 2 daemons and 2 CPU trainers (tests' tiny spec, batch 16) on this machine")
        print(f"baseline, A's cold start (join -> first step):   {cold:6.1f} s")
        print(f"B join -> first local step:                      {first_step:6.1f} s  ({first_step / cold:.2f}x)")
        print(f"B join -> both trainers average with 2 peers:    {together:6.1f} s  ({together / cold:.2f}x)")
        print(f"B join -> B's global step >= A's at join ({target}):  {caught_up:6.1f} s  ({caught_up / cold:.2f}x)")
    finally:
        for d in (a, b):
            d.reap()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
