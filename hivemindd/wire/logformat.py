"""The one log format of hivemindd: every line starts with ISO 8601 UTC time in milliseconds.

The daemon's lines, its notes in the trainer log, the trainer's own lines and hivemind's
(routed through the same handlers) all start like ``2025-01-31T14:05:00.123Z``; hivemind
logs at WARNING unless the owner asks for more. Shared by the daemon and the trainer.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, MutableMapping
from typing import Any

HIVEMIND_LEVEL_VARIABLE = "HIVEMIND_LOGLEVEL"  # read by hivemind when imported, and inherited by the trainer


def iso_time(moment: float | None = None) -> str:
    """``moment`` (unix time; default now) as every log line of hivemindd starts: ``2025-01-31T14:05:00.123Z``."""
    moment = time.time() if moment is None else moment
    millis = int(moment * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment)) + f".{millis:03d}Z"


class IsoFormatter(logging.Formatter):
    """A logging formatter whose ``%(asctime)s`` is ``iso_time``'s."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return iso_time(record.created)


def add_iso_time(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor: the ``timestamp`` key, as ``iso_time`` writes it."""
    event_dict["timestamp"] = iso_time()
    return event_dict


def hivemind_level(debug: bool = False) -> str:
    """The level hivemind logs at: DEBUG with ``--log-level debug``; else $HIVEMIND_LOGLEVEL if the owner set it;
    else WARNING (its INFO lines, several a second while training, drown everything else)."""
    return "DEBUG" if debug else os.environ.get(HIVEMIND_LEVEL_VARIABLE) or "WARNING"


def route_hivemind_logs(level: str, use_hivemind_log_handler: Callable[[str], None]) -> None:
    """hivemind's loggers at ``level``, through this process's root handlers (so its lines look like ours).

    hivemind installs its own handler (a yearless "Nov 21 19:51:14.423 [INFO]" stamp) on the ``hivemind``
    logger; "nowhere" takes it off and lets the records propagate to the root logger instead. The caller
    passes ``hivemind.utils.logging.use_hivemind_log_handler`` (this module imports only the standard library).
    """
    use_hivemind_log_handler("nowhere")
    logging.getLogger("hivemind").setLevel(level)
    logging.addLevelName(logging.WARNING, "WARNING")  # hivemind renames it "WARN" for its own format
