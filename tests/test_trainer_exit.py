"""How a trainer leaves: goodbye to the swarm, exit-time cleanup, and no interpreter teardown after "stopped".

The daemon calls a leave or a pause done only when the trainer process has exited. With torch
and hivemind loaded, Python's own teardown (its final garbage collection over the whole heap)
took 3–9 s on a busy 2-core host after the trainer had already said "stopped"; a leave was
reported to take 17 s. exit_promptly runs the atexit handlers (multiprocessing joins hivemind's
children there) and then ends the process without that teardown.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_trainer_process import Trainer, make_launch

ISO_START = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")
HIVEMIND_OWN_FORMAT = re.compile(r"^[A-Z][a-z]{2} +\d{1,2} \d\d:\d\d:\d\d\.\d+ \[")  # "Dec 01 10:55:38.288 [INFO]"


def test_exit_promptly_runs_atexit_handlers_but_skips_the_teardown() -> None:
    code = """
import atexit
from hivemindd.trainer.__main__ import exit_promptly

class Teardown:
    def __del__(self):
        print("interpreter teardown ran", flush=True)

keep = Teardown()
atexit.register(lambda: print("atexit handler ran", flush=True))
exit_promptly(3)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert "atexit handler ran" in done.stdout
    assert "interpreter teardown ran" not in done.stdout


@pytest.mark.timeout(150)
def test_a_stopped_trainer_leaves_cleanly_and_logs_in_one_format(short_tmp: Path, demo_cache: Path,
                                                                  bootstrap: list[str], process_groups: list[int]) -> None:
    trainer = Trainer(make_launch(short_tmp, demo_cache, bootstrap), process_groups)
    # A few global steps: hivemind's optimizer says something at INFO several times a second meanwhile.
    trainer.wait_for(lambda e: e["type"] == "progress" and e["epoch"] >= 2, timeout=120)
    trainer.proc.send_signal(signal.SIGTERM)
    assert trainer.wait_exit() == 0
    assert trainer.drain()[-1]["type"] == "stopped"
    lines = trainer.log_path.read_text(errors="replace").splitlines()
    text = "\n".join(lines)
    assert "left the swarm in" in text
    assert "did not shut down within the grace period" not in text and "exit cleanup still running" not in text
    # hivemind's chatter stays below WARNING, and whatever it does say comes in the trainer's own format.
    assert not any(HIVEMIND_OWN_FORMAT.match(line) for line in lines), text[-3000:]
    assert "accumulated" not in text and "Transitioning to epoch" not in text
    logged = [line for line in lines if re.match(r"\d{4}-\d\d-\d\d", line)]
    assert logged and all(ISO_START.match(line) for line in logged), logged[:5]
