"""hmctl logs: the daemon's own lines (kept in a ring), --trainer/--daemon, --since, and -f until interrupted."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hivemindd.hmctl.commands import since_time
from hivemindd.host.logfile import DaemonLogRing, timed
from hivemindd.wire.protocol import LogQuery, RequestError
from tests.support.daemons import DaemonProcess, daemon_at, seed_paused_run
from tests.support.dirs import short_dir
from tests.support.waiting import wait_until


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with short_dir("hmlg") as root, daemon_at(seed_paused_run(root / "a").root) as d:  # paused: no trainer needs the cores
        yield d


def test_the_ring_keeps_whole_lines_and_passes_them_on() -> None:
    sink = io.StringIO()
    ring = DaemonLogRing(sink, capacity=3)
    ring.write("one\ntw")
    ring.write("o\n\x1b[32mthree\x1b[0m\nfour\n")
    assert sink.getvalue() == "one\ntwo\n\x1b[32mthree\x1b[0m\nfour\n"
    assert [i.line for i in ring.tail(10)] == ["two", "three", "four"] and ring.seq == 4
    assert [i.line for i in ring.after(3, 10)] == ["four"]


def test_lines_without_a_time_keep_their_neighbours() -> None:
    lines = ["Traceback (most recent call last):", "2025-01-31 14:05:00,500 INFO x", "  File y", "Nov 21 19:51:14.423 [INFO] z"]
    times = [t for t, _ in timed(lines)]
    assert times[0] == times[1] == times[2] and times[1] % 1 == pytest.approx(0.5)


@pytest.mark.parametrize("query, words", [({"source": "both"}, "source must be one of"),
                                          ({"since": "yesterday"}, "since must be a unix time"),
                                          ({"after_daemon": "-2"}, "after_daemon must be >= 0")])
def test_log_query_errors_name_the_parameter(query: dict[str, str], words: str) -> None:
    with pytest.raises(RequestError, match=words) as err:
        LogQuery.parse(query)
    assert err.value.field == next(iter(query))


def test_since_takes_durations_and_times() -> None:
    now = time.time()
    assert since_time("10m", now) == now - 600
    assert since_time("2025-01-31T14:05", now) == time.mktime((2025, 1, 31, 14, 5, 0, 0, 0, -1))
    with pytest.raises(ValueError, match="neither a duration"):
        since_time("last tuesday", now)


def test_daemon_lines_are_served_and_filtered(daemon: DaemonProcess) -> None:
    shown = daemon.hmctl("logs", "--daemon", "-n", "200")
    assert shown.returncode == 0 and "daemon.started" in shown.stdout and "[daemon]" not in shown.stdout
    both = daemon.hmctl("logs", "-n", "200")
    assert "[daemon]" in both.stdout and "daemon.started" in both.stdout
    trainer_only = daemon.hmctl("logs", "--trainer", "-n", "200")
    assert "daemon.started" not in trainer_only.stdout
    assert daemon.hmctl("logs", "--daemon", "--since", "2099-01-01T00:00").stdout == ""
    bad = daemon.hmctl("logs", "--since", "soonish")
    assert bad.returncode == 2 and "neither a duration" in bad.stderr
    clash = daemon.hmctl("logs", "--trainer", "--daemon")
    assert clash.returncode == 2 and "exclude each other" in clash.stderr


def test_follow_streams_new_daemon_lines_until_interrupted(daemon: DaemonProcess, tmp_path: Path) -> None:
    out = tmp_path / "follow.out"
    with open(out, "wb") as sink:
        follower = subprocess.Popen([sys.executable, "-m", "hivemindd.cli", "--socket", str(daemon.client.socket_path),
                                     "logs", "-f", "--daemon", "-n", "1"], stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: out.read_text().strip(), 30, "the first line")
        assert daemon.hmctl("pause", "--for", "2h").returncode == 0  # the daemon logs run.paused
        wait_until(lambda: "run.paused" in out.read_text(), 30, "run.paused to stream")
    finally:
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=10) == 0


def test_daemon_lines_start_with_iso_utc_milliseconds(daemon: DaemonProcess) -> None:
    import re

    shown = daemon.hmctl("logs", "--daemon", "-n", "200")
    lines = [line for line in shown.stdout.splitlines() if line.strip()]
    assert lines and any("daemon.started" in line for line in lines)
    dated = [line for line in lines if re.match(r"\d{4}-\d\d-\d\d", line)]
    assert dated and all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ", line) for line in dated), dated


def _log_in_a_daemon_process(level: str) -> str:
    """configure_logging as `hivemindd --log-level LEVEL` calls it, then lines from structlog and hivemind."""
    code = f"""
import logging, structlog
from hivemindd.daemon import configure_logging
configure_logging("console", {level!r})
structlog.get_logger("t").info("daemon.started", peer_id="Qm")
from hivemind.utils.logging import get_logger
get_logger("hivemind.optim.progress_tracker").info("demo accumulated 992 samples for epoch #1")
get_logger("hivemind.dht.dht").warning("DHT did not shut down within the grace period")
import os; print("HIVEMIND_LOGLEVEL=" + os.environ["HIVEMIND_LOGLEVEL"], flush=True)
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "HIVEMIND_LOGLEVEL"}
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_hivemind_logs_at_warning_unless_debug_in_the_daemons_format() -> None:
    import re

    quiet = _log_in_a_daemon_process("info")
    assert "accumulated 992 samples" not in quiet and "HIVEMIND_LOGLEVEL=WARNING" in quiet  # trainers inherit it
    lines = [line for line in quiet.splitlines() if "daemon.started" in line or "grace period" in line]
    assert len(lines) == 2, quiet
    for line in lines:  # hivemind's warning in the daemon's own format, not "Dec 01 10:55:38.288 [WARN]"
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \[", line), line
    chatty = _log_in_a_daemon_process("debug")
    assert "accumulated 992 samples" in chatty and "HIVEMIND_LOGLEVEL=DEBUG" in chatty


def test_log_level_is_checked_and_carried_in_the_config(tmp_path: Path) -> None:
    from hivemindd.host.config import ConfigError, build_config

    assert build_config({"state_dir": str(tmp_path), "log_level": "debug"}).log_level == "debug"
    assert build_config({"state_dir": str(tmp_path)}).log_level == "info"
    with pytest.raises(ConfigError, match="log_level must be 'debug', 'info', 'warning' or 'error', got 'loud'"):
        build_config({"state_dir": str(tmp_path), "log_level": "loud"})
