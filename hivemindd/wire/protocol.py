"""The control API's schema, shared by the daemon's routes (api.py) and hmctl (cli.py).

Every route is versioned under ``/v1`` and speaks JSON. Errors are
``{"error": {"code": ..., "message": ..., "field": ...}}`` with a 4xx status for
bad requests and 409 for requests that conflict with the current state.
The same routes are described for other clients in ``hivemindd/wire/openapi.yaml``.
Pure stdlib: hmctl imports this module and must stay fast.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

PREFIX = "/v1"
MAX_BODY_BYTES = 1 << 20
MAX_LOG_LINES = 10_000
MAX_NESTING = 32  # lists and objects inside each other: a request or a run spec needs three or four

# Named exit codes (sysexits.h), used by hmctl.
EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_NOPERM = 77

MAX_PAUSE_S = 366 * 86400  # a year and a day: longer is a typo, and would overflow nothing but the owner's patience

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error message must not echo a megabyte back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def check_run_id(run_id: object) -> str | None:
    """Why ``run_id`` is unusable, or None. Run ids become path parts, so no slashes or dots first."""
    if not isinstance(run_id, str):
        return f"must be a string, got {type(run_id).__name__}"
    if not RUN_ID_PATTERN.fullmatch(run_id):
        return f"{shown(run_id)} is not a run id: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
    return None


def too_deep(value: Any, limit: int = MAX_NESTING) -> bool:
    """Whether parsed JSON or TOML nests lists and objects more than ``limit`` levels deep.

    Iterative, so it answers for any depth; code that walks such a value recursively
    (``repr``, ``json.dumps``, a dataclass builder) would raise RecursionError instead.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    summary: str
    read_only: bool = False  # open to every local user; the others need operator rights


ROUTES = {
    "status": Route("GET", f"{PREFIX}/status", "This host: peer id, run, pause, trainer, discovery.", True),
    "peers": Route("GET", f"{PREFIX}/peers", "Fresh peers found through discovery (of the run, or hosts when not joined).",
                   True),
    "join": Route("POST", f"{PREFIX}/join", "Join a run: body {run_id, spec_toml?, spec_source?, device?, batch_size?, workers?}."),
    "leave": Route("POST", f"{PREFIX}/leave", "Leave the run: the trainer checkpoints and stops."),
    "pause": Route("POST", f"{PREFIX}/pause", "Stop training but stay joined: body {for?: '1h30m', after_checkpoint?: "
                   "bool}; persisted across restarts, a timed pause ends by itself."),
    "resume": Route("POST", f"{PREFIX}/resume", "End any pause: the trainer restarts from its checkpoint."),
    "logs": Route("GET", f"{PREFIX}/logs", "Last log lines: query n (1..10000), source (trainer|daemon|all), since "
                  "(unix time), after / after_daemon (line offsets, for follow mode)."),
    "swarm": Route("GET", f"{PREFIX}/swarm", "Every live peer of the run from the DHT progress records, plus totals.",
                   True),
    "history": Route("GET", f"{PREFIX}/metrics/history", "This host's metrics over time (the run's CSV files), "
                     "columnar: query since (unix time), run_id.", True),
    "metrics": Route("GET", "/metrics", "Prometheus text format: trainer, progress, checkpoint age, peers, DHT.", True),
    "predict": Route("POST", f"{PREFIX}/predict", "Classify one image (raw body, at most 8 MiB) with the run's "
                     "checkpoint: query checkpoint (best|latest|final), top (1..100)."),
}

MAX_IMAGE_BYTES = 8 << 20
CHECKPOINT_NAMES = ("best", "latest", "final")
LOG_SOURCES = ("trainer", "daemon", "all")


class RequestError(ValueError):
    """A request the daemon will not act on; ``field`` names the culprit when there is one."""

    def __init__(self, message: str, field: str | None = None, status: int = 400, code: str = "bad_request") -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = status
        self.code = code

    def to_body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


def _check_fields(body: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for key in body:
        if key not in allowed:
            raise RequestError(f"unknown field {shown(key)} (allowed: {', '.join(sorted(allowed))})", field=key[:64])
    return body


def _optional(body: dict[str, Any], key: str, kind: type, what: str) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestError(f"{key} must be {what}, got {shown(value)}", field=key)
    return value


@dataclass(frozen=True)
class JoinRequest:
    """Join ``run_id``; with ``spec_toml`` the run is created first if it does not exist."""

    run_id: str
    spec_toml: str | None = None
    spec_source: str = "spec.toml"
    device: str | None = None
    batch_size: int | None = None
    workers: int | None = None

    @classmethod
    def parse(cls, body: Any) -> JoinRequest:
        body = _check_fields(body, {"run_id", "spec_toml", "spec_source", "device", "batch_size", "workers"})
        if "run_id" not in body:
            raise RequestError("run_id is required", field="run_id")
        problem = check_run_id(body["run_id"])
        if problem:
            raise RequestError(f"run_id {problem}", field="run_id")
        return cls(
            run_id=body["run_id"],
            spec_toml=_optional(body, "spec_toml", str, "the text of a TOML run spec"),
            spec_source=_optional(body, "spec_source", str, "a file name") or "spec.toml",
            device=_optional(body, "device", str, "a string"),
            batch_size=_optional(body, "batch_size", int, "an integer"),
            workers=_optional(body, "workers", int, "an integer"),
        )

    def to_body(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


_DURATION_PART = re.compile(r"(\d+)([dhms])")
_UNIT_S = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: object, field: str = "for") -> float:
    """Seconds in ``text`` like ``90s``, ``30m``, ``2h``, ``1h30m``, ``1d``; RequestError naming ``field``."""
    hint = "use a number with a unit, largest first, like 90s, 30m, 2h or 1h30m"
    if not isinstance(text, str):
        raise RequestError(f"{field} must be a duration string ({hint}), got {shown(text)}", field=field)
    parts = []
    pos = 0
    while pos < len(text) <= 32:
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise RequestError(f"{field}: {shown(text, 40)} is not a duration: {hint}", field=field)
        parts.append(match)
        pos = match.end()
    units = [m.group(2) for m in parts]
    if not parts or pos != len(text) or units != sorted(set(units), key="dhms".index):
        raise RequestError(f"{field}: {shown(text, 40)} is not a duration: {hint}", field=field)
    seconds = sum(int(m.group(1)) * _UNIT_S[m.group(2)] for m in parts)
    if not 0 < seconds <= MAX_PAUSE_S:
        raise RequestError(f"{field} must be more than 0s and at most {MAX_PAUSE_S // 86400}d, got {shown(text)}",
                           field=field)
    return float(seconds)


def format_duration(seconds: float) -> str:
    """The inverse of ``parse_duration`` for display, rounded to the largest two units: ``1h30m``, ``29m``, ``45s``."""
    total = max(0, round(seconds))
    out: list[str] = []
    for unit in "dhms":
        amount, total = divmod(total, _UNIT_S[unit])
        if amount and len(out) < 2:
            out.append(f"{amount}{unit}")
        elif out:
            break  # keep the two largest units only when they are adjacent
    return "".join(out) or "0s"


@dataclass(frozen=True)
class PauseRequest:
    """Pause now (or after the trainer's next checkpoint), indefinitely or for ``duration_s`` seconds."""

    duration_s: float | None = None
    after_checkpoint: bool = False

    @classmethod
    def parse(cls, body: Any) -> PauseRequest:
        if body is None:
            return cls()
        body = _check_fields(body, {"for", "after_checkpoint"})
        duration = None if body.get("for") is None else parse_duration(body["for"], "for")
        after = body.get("after_checkpoint", False)
        if not isinstance(after, bool):
            raise RequestError(f"after_checkpoint must be true or false, got {shown(after)}", field="after_checkpoint")
        return cls(duration_s=duration, after_checkpoint=after)


def parse_empty(body: Any) -> None:
    """Bodies of leave/pause/resume: absent or ``{}``."""
    if body is not None:
        _check_fields(body, set())


def parse_no_query(query: dict[str, str]) -> None:
    """Routes without documented query parameters take none; a stray one is a typo worth reporting."""
    for key in query:
        raise RequestError(f"unknown query parameter {shown(key)} (this endpoint takes none)", field=key[:64])


def parse_log_query(query: dict[str, str]) -> tuple[int, int | None]:
    """``n`` lines (default 100) and an optional ``after`` offset for follow mode (see ``LogQuery``)."""
    parsed = LogQuery.parse(query)
    return parsed.n, parsed.after


def _query_int(query: dict[str, str], key: str, lowest: int, highest: int | None = None) -> int | None:
    if key not in query:
        return None
    try:
        value = int(query[key])
    except ValueError:
        raise RequestError(f"{key} must be an integer, got {shown(query[key])}", field=key) from None
    if value < lowest:
        raise RequestError(f"{key} must be >= {lowest}", field=key)
    if highest is not None and value > highest:
        raise RequestError(f"{key} must be in {lowest}..{highest}, got {value}", field=key)
    return value


def _query_time(query: dict[str, str], key: str) -> float | None:
    if key not in query:
        return None
    try:
        value = float(query[key])
    except ValueError:
        value = float("nan")
    if not 0 <= value < 1e11:  # also refuses nan and inf
        raise RequestError(f"{key} must be a unix time in seconds, got {shown(query[key])}", field=key)
    return value


@dataclass(frozen=True)
class LogQuery:
    """``n`` lines (default 100) of ``source``; ``after``/``after_daemon`` continue a follow; ``since`` cuts by time.

    The trainer's log and the daemon's own log lines are numbered separately, so a
    follower keeps one offset for each (``next`` and ``next_daemon`` in the answer).
    ``source`` defaults to the trainer's log, which is what clients before 0.2 expect.
    """

    n: int = 100
    after: int | None = None
    after_daemon: int | None = None
    source: str = "trainer"
    since: float | None = None

    @classmethod
    def parse(cls, query: dict[str, str]) -> LogQuery:
        allowed = ("n", "after", "after_daemon", "source", "since")
        for key in query:
            if key not in allowed:
                raise RequestError(f"unknown query parameter {shown(key)} (allowed: {', '.join(allowed)})",
                                   field=key[:64])
        if "n" in query:
            try:
                n = int(query["n"])
            except ValueError:
                raise RequestError(f"n must be an integer, got {shown(query['n'])}", field="n") from None
            if not 1 <= n <= MAX_LOG_LINES:
                raise RequestError(f"n must be in 1..{MAX_LOG_LINES}, got {n}", field="n")
        else:
            n = 100
        source = query.get("source", "trainer")
        if source not in LOG_SOURCES:
            raise RequestError(f"source must be one of {', '.join(LOG_SOURCES)}, got {shown(source)}", field="source")
        return cls(n=n, after=_query_int(query, "after", 0), after_daemon=_query_int(query, "after_daemon", 0),
                   source=source, since=_query_time(query, "since"))


@dataclass(frozen=True)
class HistoryQuery:
    """``since`` (unix time: only newer rows), ``cursor`` (the last answer's: only rows not sent yet),
    ``run_id`` (default: the run this host is in)."""

    since: float | None = None
    cursor: tuple[int, int, int] | None = None
    run_id: str | None = None

    @classmethod
    def parse(cls, query: dict[str, str]) -> HistoryQuery:
        for key in query:
            if key not in ("since", "cursor", "run_id"):
                raise RequestError(f"unknown query parameter {shown(key)} (allowed: since, cursor, run_id)",
                                   field=key[:64])
        run_id = query.get("run_id")
        if run_id is not None and (problem := check_run_id(run_id)):
            raise RequestError(f"run_id {problem}", field="run_id")
        cursor = None
        if "cursor" in query:
            parts = query["cursor"].split(".")
            if len(parts) != 3 or not all(p.isdigit() and len(p) <= 12 for p in parts):
                raise RequestError(f"cursor must be the `cursor` of an earlier answer (N.N.N), got {shown(query['cursor'])}",
                                   field="cursor")
            cursor = (int(parts[0]), int(parts[1]), int(parts[2]))
        return cls(since=_query_time(query, "since"), cursor=cursor, run_id=run_id)


def parse_predict_query(query: dict[str, str]) -> tuple[str, int]:
    """``checkpoint`` (best, latest or final; default best) and ``top`` (1..100, default 5)."""
    for key in query:
        if key not in ("checkpoint", "top"):
            raise RequestError(f"unknown query parameter {shown(key)} (allowed: checkpoint, top)", field=key[:64])
    checkpoint = query.get("checkpoint", "best")
    if checkpoint not in CHECKPOINT_NAMES:
        raise RequestError(f"checkpoint must be one of {', '.join(CHECKPOINT_NAMES)}, got {shown(checkpoint)}",
                           field="checkpoint")
    top = _query_int(query, "top", 1, 100)
    return checkpoint, 5 if top is None else top
