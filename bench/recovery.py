"""Recovery after SIGKILL of the trainer: seconds to the first new step, and steps lost.

    python bench/recovery.py [--kills 3]

Starts one daemon on a tiny demo run (checkpoint every 5 local steps), then
kills the trainer's process group at a random moment after each checkpoint and
measures: seconds from the kill until the restarted trainer reports a step
past its resume point, and steps lost = last step seen before the kill minus
the step it resumed at (goal: lost <= checkpoint.every_steps). The baseline in
the same run is the trainer's cold start (join → first step).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.daemons import DaemonProcess
from tests.support.specs import spec_toml
from tests.support.waiting import wait_until

EVERY_STEPS = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hmb", dir="/tmp"))
    (root / "disc").mkdir()
    spec = root / "tiny.toml"
    spec.write_text(spec_toml())
    daemon = DaemonProcess(root / "d", root / "disc").start()
    try:
        start = time.monotonic()
        daemon.call("join", {"run_id": "bench", "spec_toml": spec.read_text(), "device": "cpu", "batch_size": 16})
        wait_until(lambda: (daemon.trainer()["step"] or 0) >= 1, 600, "the first step", interval=0.05)
        cold = time.monotonic() - start
        print(f"cold start (join -> first step):      {cold:6.1f} s")
        rows = []
        for kill in range(args.kills):
            t = wait_until(lambda: (t := daemon.trainer())["state"] == "running" and t["checkpoint_step"] and t,
                           600, "a checkpoint", interval=0.05)
            time.sleep(random.uniform(0, 2))  # a random moment in the checkpoint interval
            t = daemon.trainer()
            last_step, pid = t["step"], t["pid"]
            killed_at = time.monotonic()
            os.killpg(pid, signal.SIGKILL)
            resumed = wait_until(lambda pid=pid: (t := daemon.trainer())["pid"] not in (None, pid) and t["resumed_from"]
                                 and t, 600, "the restart", interval=0.05)
            resume_step = resumed["step"]
            wait_until(lambda s=resume_step: (daemon.trainer()["step"] or 0) > s, 600, "a new step", interval=0.05)
            seconds = time.monotonic() - killed_at
            lost = last_step - resume_step
            rows.append((seconds, lost))
            print(f"kill {kill + 1}: first step after restart {seconds:6.1f} s, steps lost {lost} "
                  f"(killed at step {last_step}, resumed at {resume_step} from {resumed['resumed_from']})")
        mean_s = sum(r[0] for r in rows) / len(rows)
        print(f"mean recovery {mean_s:.1f} s = {mean_s / cold:.2f}x a cold start; "
              f"max steps lost {max(r[1] for r in rows)} (goal <= {EVERY_STEPS})")
    finally:
        daemon.stop()
        daemon.reap()


if __name__ == "__main__":
    main()
