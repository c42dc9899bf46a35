"""Random requests at a live daemon's socket: every answer is a 4xx or 2xx, never a 5xx, and the daemon stays up.

Requests are raw HTTP/1.0 over the unix socket (the way hmctl talks), so
methods, paths, query strings, headers and bodies can be anything a local
program might send. Framing headers are left to the test, so a request never
leaves the server waiting for bytes that will not come.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hivemindd.protocol import MAX_BODY_BYTES, ROUTES
from tests.e2e.conftest import DaemonProcess, check_schema

pytestmark = pytest.mark.timeout(240)

FIELDS = ["run_id", "spec_toml", "spec_source", "device", "batch_size", "workers", "for", "after_checkpoint"]
PATHS = [*sorted({r.path for r in ROUTES.values()}), "/", "/v1", "/v1/", "/v2/status", "/v1/status/",
         "/v1/../v1/status", "/v1/join/../pause", "/v1/%2e%2e/status", "/v1/st%00tus"]


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    root = Path(tempfile.mkdtemp(prefix="hmf", dir="/tmp"))
    (root / "discovery").mkdir()
    d = DaemonProcess(root / "a", root / "discovery")
    try:
        d.start()
        yield d
    finally:
        d.reap()
        shutil.rmtree(root, ignore_errors=True)


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
durations = st.sampled_from(["90s", "30m", "1h30m", "0s", "-1m", "1h1h", "366d", "367d", "9" * 40 + "h", "1.5h", ""])
run_ids = st.sampled_from(["", "..", "../etc", "a/b", "a\x00b", "x" * 65, ".hidden", "ok-run", "ü"]) | st.text(max_size=70)
field_values = st.one_of(json_values, durations, run_ids)
objects = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=12), field_values, max_size=5)
bodies = st.one_of(
    st.none(),
    st.binary(max_size=300),
    objects.map(lambda o: json.dumps(o).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.just(b"[" * 100_000 + b"]" * 100_000),  # deep nesting: a RecursionError in the parser
    st.just(b'{"run_id": ' * 3000 + b'"x"' + b"}" * 3000),
    st.just(b'{"run_id": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}'),  # over the size limit
)
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]) | st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=8)
paths = st.sampled_from(PATHS) | st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e),
                                         max_size=40).map(lambda p: "/" + p)
routes = st.sampled_from([(r.method, r.path) for r in ROUTES.values()]) | st.tuples(methods, paths)  # mostly real ones
queries = st.just({}) | st.dictionaries(st.sampled_from(["n", "after", "x"]) | st.text(max_size=8),
                          st.text(max_size=12) | st.integers().map(str), max_size=3)
header_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=16).filter(
    lambda h: h not in ("content-length", "transfer-encoding", "host", "connection", "expect", "upgrade"))
headers = st.dictionaries(header_names | st.sampled_from(["content-type", "authorization", "accept"]),
                          st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40),
                          max_size=4)


def raw_exchange(path: Path, request: bytes) -> tuple[int, bytes, bytes]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)  # the server may answer (413) and close before reading a large body whole
        chunks = []
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = int(head.split(b"\r\n", 1)[0].split()[1])
    return status, head, body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow, HealthCheck.data_too_large])
@given(route=routes, query=queries, extra=headers, body=bodies)
def test_random_requests_never_get_a_5xx(daemon: DaemonProcess, route: tuple[str, str], query: dict[str, str],
                                         extra: dict[str, str], body: bytes | None) -> None:
    method, path = route
    target = path + ("?" + urllib.parse.urlencode(query) if query else "")
    lines = [f"{method} {target} HTTP/1.0", "Host: localhost"] + [f"{k}: {v}" for k, v in extra.items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")
    status, head, reply = raw_exchange(daemon.client.socket_path, request)
    assert status < 500, (request[:300], head, reply[:300])
    event(f"HTTP {status}")  # --hypothesis-show-statistics: the spread of answers
    known = (method, path) in {(r.method, r.path) for r in ROUTES.values()}
    if known and status >= 400:  # our own refusals: JSON that says why (and which field, where there is one)
        error = json.loads(reply)
        check_schema(error, "Error")
        if status == 400 and error["error"].get("field") is None:
            assert "JSON" in error["error"]["message"] or "body" in error["error"]["message"]


def test_the_daemon_is_still_up_and_unchanged(daemon: DaemonProcess) -> None:
    status: dict[str, Any] = daemon.status()
    assert status["dht"]["alive"] and status["run_id"] is None
    assert "api.handler_failed" not in (daemon.state_dir / "daemon.log").read_text(errors="replace")


@pytest.mark.parametrize("name, body, field", [
    ("join", {"run_id": "../etc"}, "run_id"),
    ("join", {"run_id": "a/b"}, "run_id"),
    ("join", {"run_id": "a\x00b"}, "run_id"),
    ("join", {"run_id": "x" * 65}, "run_id"),
    ("join", {"run_id": ".."}, "run_id"),
    ("join", {"run_id": 5}, "run_id"),
    ("join", {"run_id": "ok", "workers": "two"}, "workers"),
    ("join", {"run_id": "ok", "batch_size": True}, "batch_size"),
    ("join", {"run_id": "ok", "device": "tpu"}, "device"),
    ("join", {"run_id": "ok", "colour": "red"}, "colour"),
    ("pause", {"for": "soon"}, "for"),
    ("pause", {"for": 30}, "for"),
    ("pause", {"after_checkpoint": 1}, "after_checkpoint"),
    ("leave", {"now": True}, "now"),
])
def test_bad_fields_are_named(daemon: DaemonProcess, name: str, body: dict[str, Any], field: str) -> None:
    err = daemon.api_error(name, body)
    assert err.status == 400 and err.body["error"]["field"] == field, err.body
    assert len(err.body["error"]["message"]) < 400  # a long value is not echoed back whole


def test_oversized_body_is_413(daemon: DaemonProcess) -> None:
    status, _, reply = raw_exchange(daemon.client.socket_path, b"POST /v1/join HTTP/1.0\r\nContent-Length: %d\r\n\r\n"
                                    % (MAX_BODY_BYTES + 1) + b"x" * (MAX_BODY_BYTES + 1))
    assert status == 413 and json.loads(reply)["error"]["code"] == "too_large"


def test_unknown_query_parameters_are_named(daemon: DaemonProcess) -> None:
    status, _, reply = raw_exchange(daemon.client.socket_path, b"GET /v1/status?verbose=1 HTTP/1.0\r\n\r\n")
    assert status == 400 and json.loads(reply)["error"]["field"] == "verbose"
