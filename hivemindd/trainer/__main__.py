"""``python -m hivemindd.trainer --launch PATH [--events-fd N]``: the trainer process.

Exit codes: 0 after a clean stop (SIGTERM/SIGINT: checkpoint and exit), 2 for a
problem a restart will not fix (bad launch file, spec, data or model; an "error"
event says which), 1 for any other crash (traceback on stderr).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from types import FrameType

from hivemindd.trainer import read_policy
from hivemindd.trainer.errors import ConfigError
from hivemindd.trainer.events import EventWriter
from hivemindd.wire.launch import TrainerLaunch
from hivemindd.wire.logformat import HIVEMIND_LEVEL_VARIABLE, IsoFormatter, hivemind_level, route_hivemind_logs
from hivemindd.wire.spec import SpecError
from hivemindd.wire.states import TrainerExit

log = logging.getLogger("hivemindd.trainer")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hivemindd.trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--launch", required=True, type=Path, help="launch file written by the supervisor (JSON)")
    parser.add_argument("--events-fd", type=int, default=None, help="inherited pipe fd for JSON-line events")
    return parser.parse_args(argv)


def configure_logging() -> None:
    """Lines on stdout (the daemon appends them to the trainer log), stamped as the daemon stamps its own.

    hivemind, imported later, logs at WARNING unless the daemon (``--log-level debug``) or the owner
    ($HIVEMIND_LOGLEVEL) says otherwise: its INFO lines come several a second while training.
    """
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(IsoFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    os.environ[HIVEMIND_LEVEL_VARIABLE] = hivemind_level()  # read when hivemind is imported; it also sets p2pd's


def install_stop_handlers(stop: threading.Event) -> None:
    """SIGTERM and SIGINT only ask the loop to stop; it checkpoints between steps."""

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        if not stop.is_set():
            log.info("%s received: will checkpoint and exit after the current step", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    # hivemind forks its DHT and averager processes (and torch its loader workers). A forked
    # child would inherit request_stop and shrug off SIGTERM, so DHT.shutdown's terminate()
    # and multiprocessing's exit-time join would wait on it forever. Children die on SIGTERM
    # and leave SIGINT (a terminal's Ctrl-C reaches the whole group) to this process.
    os.register_at_fork(after_in_child=_reset_child_signals)


def _reset_child_signals() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def read_launch(path: Path) -> TrainerLaunch:
    try:
        return TrainerLaunch.from_json(path.read_text())
    except OSError as exc:
        raise ConfigError(f"launch file {path}: cannot read it ({exc.strerror})") from None
    except SpecError as exc:
        raise ConfigError(str(exc)) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"launch file {path}: not a trainer launch file ({type(exc).__name__}: {exc})") from None


def main(argv: list[str] | None = None) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # the daemon tails the log live
    configure_logging()
    args = parse_args(argv)
    stop = threading.Event()
    install_stop_handlers(stop)
    try:
        events = EventWriter(args.events_fd)
    except OSError as exc:
        log.error("--events-fd %s is not an open file descriptor (%s)", args.events_fd, exc.strerror)
        return TrainerExit.CONFIG
    try:
        launch = read_launch(args.launch)
        read_policy.install(read_policy.for_launch(launch))  # before anything the spec names is opened
        # Imported late: torch and hivemind take seconds, and a bad launch file should fail fast.
        from hivemind.utils.logging import use_hivemind_log_handler

        from hivemindd.trainer.loop import run

        route_hivemind_logs(os.environ[HIVEMIND_LEVEL_VARIABLE], use_hivemind_log_handler)
        run(launch, events, stop)
        return TrainerExit.OK
    except ConfigError as exc:
        log.error("%s", exc)
        events.error(str(exc))
        return TrainerExit.CONFIG
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        events.error(f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__)
        traceback.print_exc()
        return TrainerExit.CRASH


def exit_promptly(code: int, grace_s: float = 15.0) -> None:
    """Exit with ``code`` once exit-time cleanup is done, without tearing the interpreter down.

    The cleanup that matters runs: atexit handlers (multiprocessing joins hivemind's children there).
    The interpreter's own teardown does not: with torch and hivemind loaded its final garbage
    collection alone took 3–9 s on a busy 2-core host, after the trainer had already said "stopped",
    and the daemon waits for the exit before it calls a leave or a pause done. If the cleanup
    hangs, the timer cuts it short.
    """

    def force() -> None:
        log.warning("exit cleanup still running after %.0fs; exiting anyway", grace_s)
        _flush_and_exit(code)

    # A daemon thread keeps running while atexit handlers run, which is where a hang would be.
    timer = threading.Timer(grace_s, force)
    timer.daemon = True
    timer.start()
    try:
        atexit._run_exitfuncs()
    finally:
        _flush_and_exit(code)


def _flush_and_exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_promptly(main())
