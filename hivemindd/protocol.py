"""The control API's schema, shared by the daemon's routes (api.py) and hmctl (cli.py).

Every route is versioned under ``/v1`` and speaks JSON. Errors are
``{"error": {"code": ..., "message": ..., "field": ...}}`` with a 4xx status for
bad requests and 409 for requests that conflict with the current state.
The same routes are described for other clients in ``hivemindd/openapi.yaml``.
Pure stdlib: hmctl imports this module and must stay fast.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

PREFIX = "/v1"
MAX_BODY_BYTES = 1 << 20
MAX_LOG_LINES = 10_000

# Named exit codes (sysexits.h), used by hmctl.
EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_run_id(run_id: object) -> str | None:
    """Why ``run_id`` is unusable, or None. Run ids become path parts, so no slashes or dots first."""
    if not isinstance(run_id, str):
        return f"must be a string, got {type(run_id).__name__}"
    if not RUN_ID_PATTERN.fullmatch(run_id):
        return f"{run_id!r} is not a run id: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
    return None


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    summary: str


ROUTES = {
    "status": Route("GET", f"{PREFIX}/status", "This host: peer id, run, pause flag, trainer, discovery."),
    "peers": Route("GET", f"{PREFIX}/peers", "Fresh peers found through discovery (of the run, or hosts when not joined)."),
    "join": Route("POST", f"{PREFIX}/join", "Join a run: body {run_id, spec_toml?, spec_source?, device?, batch_size?, workers?}."),
    "leave": Route("POST", f"{PREFIX}/leave", "Leave the run: the trainer checkpoints and stops."),
    "pause": Route("POST", f"{PREFIX}/pause", "Stop training but stay joined; persisted across restarts."),
    "resume": Route("POST", f"{PREFIX}/resume", "Undo pause: the trainer restarts from its checkpoint."),
    "logs": Route("GET", f"{PREFIX}/logs", "Last lines of the trainer log: query n (1..10000), after (line offset)."),
}


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
            raise RequestError(f"unknown field {key!r} (allowed: {', '.join(sorted(allowed))})", field=key)
    return body


def _optional(body: dict[str, Any], key: str, kind: type, what: str) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestError(f"{key} must be {what}, got {value!r}", field=key)
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


def parse_empty(body: Any) -> None:
    """Bodies of leave/pause/resume: absent or ``{}``."""
    if body is not None:
        _check_fields(body, set())


def parse_log_query(query: dict[str, str]) -> tuple[int, int | None]:
    """``n`` lines (default 100) and an optional ``after`` offset for follow mode."""
    for key in query:
        if key not in ("n", "after"):
            raise RequestError(f"unknown query parameter {key!r} (allowed: n, after)", field=key)
    try:
        n = int(query.get("n", "100"))
    except ValueError:
        raise RequestError(f"n must be an integer, got {query['n']!r}", field="n") from None
    if not 1 <= n <= MAX_LOG_LINES:
        raise RequestError(f"n must be in 1..{MAX_LOG_LINES}, got {n}", field="n")
    after = None
    if "after" in query:
        try:
            after = int(query["after"])
        except ValueError:
            raise RequestError(f"after must be an integer, got {query['after']!r}", field="after") from None
        if after < 0:
            raise RequestError("after must be >= 0", field="after")
    return n, after
