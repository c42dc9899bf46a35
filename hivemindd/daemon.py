"""``hivemindd``: the per-host daemon's command line. Flags → one DaemonConfig → ``Daemon`` (start → run → stop).

The ``Daemon`` itself lives in host.py. Signals only set a flag; SIGTERM takes
the same path as any stop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import sys
import warnings
from contextlib import suppress
from typing import Any

import click
import structlog

from hivemindd import __version__
from hivemindd.host.config import ConfigError, DaemonConfig, build_config
from hivemindd.host.core import Daemon, StartupError
from hivemindd.host.logfile import DaemonLogRing
from hivemindd.service.notify import Notifier, ServiceHeartbeat, status_line
from hivemindd.wire.logformat import HIVEMIND_LEVEL_VARIABLE, add_iso_time, hivemind_level, route_hivemind_logs


def _default(name: str) -> Any:
    """DaemonConfig's default for a field: help texts show it from there, so it is written once."""
    return DaemonConfig.__dataclass_fields__[name].default


LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(fmt: str, level: str = "info") -> DaemonLogRing:
    """Log to stderr; returns the ring that also keeps the daemon's own lines, for the API.

    Every line starts with an ISO 8601 UTC time in milliseconds (wire/logformat.py), the daemon's own
    (structlog) and those of libraries (standard logging: hivemind here and in its DHT process, aiohttp)
    alike. hivemind logs at WARNING unless ``level`` is debug (logformat.hivemind_level); the variable
    that says so is inherited by the trainers this daemon starts.
    """
    renderer: Any = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(
        colors=sys.stderr.isatty())
    daemon_log = DaemonLogRing(sys.stderr)  # stderr as before (the journal), and a ring for `hmctl logs --daemon`
    structlog.configure(
        processors=[structlog.processors.add_log_level, add_iso_time, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(LOG_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(daemon_log),  # type: ignore[arg-type]
    )
    handler = logging.StreamHandler(daemon_log)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    *([structlog.processors.format_exc_info] if fmt == "json" else []), renderer],
        foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name, add_iso_time]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    hivemind = hivemind_level(debug=level == "debug")
    os.environ[HIVEMIND_LEVEL_VARIABLE] = hivemind  # before hivemind is imported: it also sets p2pd's level
    with suppress(ImportError):
        from hivemind.utils.logging import use_hivemind_log_handler

        route_hivemind_logs(hivemind, use_hivemind_log_handler)
    return daemon_log


def raise_open_file_limit() -> tuple[int, int]:
    """Lift the soft RLIMIT_NOFILE to the hard one (1024 is the usual soft default): the world-connectable
    socket, the DHT and the trainer's pipes all take descriptors. Returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # macOS reports an unlimited hard limit but refuses more than OPEN_MAX (10240) per process.
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    for target in (wanted, 10240):
        if target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            break
        except (ValueError, OSError):
            continue
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def serve(cfg: DaemonConfig, daemon_log: DaemonLogRing | None = None) -> None:
    daemon = Daemon(cfg, daemon_log)
    # systemd Type=notify: READY once start() returns, STATUS on changes, WATCHDOG from this loop (no-op in foreground).
    heartbeat = ServiceHeartbeat(Notifier.from_environment(), lambda: status_line(daemon.status()))
    try:
        await daemon.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.request_stop)
        heartbeat.start()
        await daemon.run()
    finally:
        heartbeat.stopping()  # the watchdog keeps beating while the trainer checkpoints
        with suppress(asyncio.CancelledError):
            await daemon.stop()
        await heartbeat.close()


@click.group(invoke_without_command=True, context_settings={"auto_envvar_prefix": "HIVEMINDD",
                                                             "help_option_names": ["-h", "--help"]})
@click.option("--config", type=click.Path(dir_okay=False), help="TOML config file (keys as the long flags, '_' for '-').")
@click.option("--state-dir", help="Where state.json, keys, logs and checkpoints live. [~/.local/state/hivemindd]")
@click.option("--socket", help="Control socket path. [<state-dir>/hivemindd.sock]")
@click.option("--discovery", help="Where peers meet: file:///path or gs://bucket/prefix. [file://<state-dir>/discovery]")
@click.option("--host-maddr", multiple=True, help=f"Listen multiaddr of the DHT node (repeatable). "
                                                          f"[{' '.join(_default('host_maddrs'))}]")
@click.option("--announce-maddr", multiple=True, help="Multiaddr others should dial, with an explicit port (repeatable).")
@click.option("--initial-peer", multiple=True, help="Extra bootstrap multiaddr, /ip4/…/p2p/<peer id> (repeatable).")
@click.option("--heartbeat", type=float, help=f"Seconds between discovery refreshes. [{_default('heartbeat_s'):g}]")
@click.option("--ttl", type=float, help="Seconds after which a silent peer is ignored. [3 heartbeats]")
@click.option("--stop-timeout", type=float, help=f"Seconds the trainer gets to checkpoint and leave on stop before SIGKILL. "
                                                f"[{_default('stop_timeout_s'):g}]")
@click.option("--hang-timeout", type=float,
              help="Seconds without any progress from the trainer before it is taken for hung and restarted. "
                   f"[{_default('hang_timeout_s'):g}]")
@click.option("--crashloop-cooldown", type=float,
              help="Seconds before a trainer parked in crashloop is tried again (joining or resuming retries at once). "
                   f"[{_default('crashloop_cooldown_s'):g}]")
@click.option("--log-format", type=click.Choice(["console", "json"]), help=f"Daemon log format. [{_default('log_format')}]")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              help="Daemon log level; debug also shows hivemind's own INFO and DEBUG lines (else WARNING and up, "
                   f"or $HIVEMIND_LOGLEVEL), in the daemon and its trainers. [{_default('log_level')}]")
@click.option("--operator-group", help="Members of this group may control the daemon; other users only read status. "
                                                  f"[{_default('operator_group')}]")
@click.option("--http", help="Also serve the API on this loopback HOST:PORT, with the bearer token in <state-dir>/http.token.")
@click.option("--http-allow-remote", is_flag=True, default=None, help="Let --http bind a non-loopback address.")
@click.version_option(__version__, prog_name="hivemindd")
@click.pass_context
def main(ctx: click.Context, **flags: Any) -> None:
    """hivemindd: train one model together with other machines, no coordinator.

    Run it in the foreground (or as a service) and drive it with hmctl:

    \b
      hivemindd --state-dir ~/.local/state/hivemindd &
      hmctl join --run-id demo --spec examples/demo.toml
      hmctl status

    Every flag can also come from a HIVEMINDD_<FLAG> environment variable
    (e.g. HIVEMINDD_STATE_DIR) or the --config file; flags win.
    `hivemindd demo` starts a whole local swarm in one command.
    """
    if ctx.invoked_subcommand is not None:
        return
    try:
        cfg = build_config(flags)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    daemon_log = configure_logging(cfg.log_format, cfg.log_level)
    raise_open_file_limit()
    # hivemind imports torch, whose deprecation chatter is not the owner's concern.
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        asyncio.run(serve(cfg, daemon_log))
    except StartupError as exc:
        click.echo(f"hivemindd: {exc}", err=True)
        sys.exit(78)  # EX_CONFIG


def _register_subcommands() -> None:
    from hivemindd.service.install import service
    from hivemindd.tools.demo import demo

    main.add_command(demo)
    main.add_command(service)


_register_subcommands()

if __name__ == "__main__":
    main()
