"""Who may control the daemon: peer credentials on the unix socket, the bearer token on loopback TCP.

The decision rule is checked on given (uid, groups); the live daemon is checked
with real credentials: this process's own, and, when the tests run as root,
clients that really run as other users (``subprocess`` with ``user=``).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from hivemindd.api.auth import (
    Access,
    Authorizer,
    LoopbackSecrets,
    decide,
    groups_of,
    identity_check_available,
    peer_credentials,
)
from hivemindd.cli import main as cli_main
from hivemindd.hmctl.client import Client
from hivemindd.wire.protocol import EX_NOPERM
from tests.support.daemons import DaemonProcess, daemon_at
from tests.support.dirs import short_dir
from tests.support.repo import REPO, check_schema
from tests.support.users import IS_ROOT, NOBODY, STRANGER, as_user

pytestmark = pytest.mark.timeout(180)

@pytest.mark.parametrize("uid, gids, expected", [
    (0, set(), Access.FULL),  # root
    (1000, {1000}, Access.FULL),  # the daemon's own user
    (1001, {1001, 4242}, Access.FULL),  # member of the operator group
    (1001, {1001, 27}, Access.READ),  # anyone else
])
def test_the_rule(uid: int, gids: set[int], expected: Access) -> None:
    assert decide(uid, gids, daemon_uid=1000, operator_gid=4242) is expected


def test_without_the_operator_group_only_root_and_the_daemon_user_control() -> None:
    assert decide(1001, {1001, 4242}, daemon_uid=1000, operator_gid=None) is Access.READ
    assert decide(1000, set(), daemon_uid=1000, operator_gid=None) is Access.FULL


def test_kernel_reports_the_credentials_of_the_other_end() -> None:
    assert identity_check_available("linux") and identity_check_available("darwin")
    assert not identity_check_available("win32") and not identity_check_available("cygwin")
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        creds = peer_credentials(a)
    assert (creds.uid, creds.gid, creds.pid) == (os.geteuid(), os.getegid(), os.getpid())
    assert Authorizer("no-such-group-hm").access(creds) is Access.FULL  # our own uid
    with pytest.raises(OSError, match="no peer credentials"):
        peer_credentials(a, platform="win32")


def test_group_membership_comes_from_the_group_database() -> None:
    assert 65534 in groups_of(NOBODY, 65534)
    assert groups_of(STRANGER, STRANGER) == {STRANGER}  # no passwd entry: only what the kernel said


def test_refusal_says_which_group_to_join() -> None:
    message = Authorizer("nogroup").refusal(None)
    assert "'nogroup'" in message and "sudo usermod -aG nogroup $USER" in message and "groupadd" not in message
    missing = Authorizer("no-such-group-hm").refusal(None)
    assert "sudo groupadd no-such-group-hm && sudo usermod -aG no-such-group-hm $USER" in missing


class Live:
    """A daemon whose operator group is nogroup (NOBODY is in it), and clients acting as other users."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.daemon = daemon

    def exchange_as(self, uid: int, method: str, path: str, body: str | None = None) -> tuple[int, Any]:
        client = Client(self.daemon.client.socket_path, timeout=30)

        def request() -> Any:
            status, raw = client.exchange(method, path, body.encode() if body is not None else None)
            return [status, json.loads(raw)]

        status, reply = as_user(uid, request)
        return status, reply

    def hmctl_as(self, uid: int, *args: str) -> tuple[int, str]:
        def invoke() -> Any:
            result = CliRunner().invoke(cli_main, ["--socket", str(self.daemon.client.socket_path), *args])
            return [result.exit_code, result.output]

        code, output = as_user(uid, invoke)
        return code, output


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    with short_dir("hma") as root:
        os.chmod(root, 0o755)  # a runtime dir others can traverse, as systemd's RuntimeDirectory
        with daemon_at(root / "state", "--operator-group", "nogroup", "--http", "127.0.0.1:0",
                       socket=root / "run" / "hm.sock") as daemon:
            yield Live(daemon)


def test_socket_is_world_connectable_because_each_request_is_checked(live: Live) -> None:
    assert identity_check_available()
    mode = stat.S_IMODE(os.stat(live.daemon.client.socket_path).st_mode)
    assert mode == 0o666


def test_own_user_has_full_control(live: Live) -> None:
    err = live.daemon.api_error("pause", {})
    assert err.status == 409 and "not in a run" in str(err)  # authorized; refused only for the state
    assert live.daemon.call("logs")["lines"] is not None


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run a client as another uid; the rule is unit-tested above")
def test_other_users_may_read_status_but_not_control(live: Live) -> None:
    status, body = live.exchange_as(STRANGER, "GET", "/v1/status")
    assert status == 200
    check_schema(body, "Status")
    assert live.exchange_as(STRANGER, "GET", "/v1/peers")[0] == 200
    for method, path, payload in [("POST", "/v1/pause", "{}"), ("POST", "/v1/join", '{"run_id": "x"}'),
                                  ("POST", "/v1/leave", None), ("POST", "/v1/resume", None), ("GET", "/v1/logs", None)]:
        status, body = live.exchange_as(STRANGER, method, path, payload)
        assert status == 403, (path, body)
        check_schema(body, "Error")
        assert body["error"]["code"] == "forbidden"
        assert "uid 65533" in body["error"]["message"] and "sudo usermod -aG nogroup $USER" in body["error"]["message"]
    code, output = live.hmctl_as(STRANGER, "pause")
    assert code == EX_NOPERM
    assert "join the operator group 'nogroup'" in output and len(output.strip().splitlines()) == 1
    code, output = live.hmctl_as(STRANGER, "status")
    assert code == 0 and "peer " in output
    assert live.daemon.status()["dht"]["alive"]


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run a client as another uid; the rule is unit-tested above")
def test_operator_group_members_have_full_control(live: Live) -> None:
    status, body = live.exchange_as(NOBODY, "POST", "/v1/pause", "{}")
    assert status == 409 and "not in a run" in body["error"]["message"]  # past the check, refused for the state
    assert live.exchange_as(NOBODY, "GET", "/v1/logs")[0] == 200


def http(url: str, token: str | None = None, method: str = "GET", body: bytes | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method, data=body)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_loopback_http_needs_the_bearer_token(live: Live) -> None:
    listener = live.daemon.status()["http"]
    assert listener["url"].startswith("http://127.0.0.1:") and not listener["url"].endswith(":0")
    token_file = Path(listener["token_file"])
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    for given in (None, "wrong", token + "x", ""):
        status, body = http(listener["url"] + "/v1/status", given)
        assert status == 401, given
        check_schema(body, "Error")
        assert "Authorization: Bearer" in body["error"]["message"] and str(token_file) in body["error"]["message"]
    status, body = http(listener["url"] + "/v1/status", token)
    assert status == 200 and body["peer_id"] == live.daemon.status()["peer_id"]
    status, body = http(listener["url"] + "/v1/pause", token, "POST", b"{}")
    assert status == 409  # full control with the token
    status, body = http(listener["url"] + "/v1/pause", None, "POST", b"{}")
    assert status == 401


def test_the_token_is_kept_across_restarts(live: Live) -> None:
    token_file = Path(live.daemon.status()["http"]["token_file"])
    before = token_file.read_text()
    assert live.daemon.stop() == 0
    live.daemon.start()
    assert token_file.read_text() == before
    assert live.daemon.status()["http"]["url"]


def run_daemon_expecting_failure(tmp: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hivemindd.daemon", "--state-dir", str(tmp / "s"), *flags],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_non_loopback_http_is_refused_unless_allowed(tmp_path: Path) -> None:
    result = run_daemon_expecting_failure(tmp_path, "--http", "0.0.0.0:0")
    assert result.returncode == 78
    assert "0.0.0.0 is not a loopback address" in result.stderr and "--http-allow-remote" in result.stderr
    assert not (tmp_path / "s" / "http.token").exists()  # refused before anything was made
    bad = run_daemon_expecting_failure(tmp_path, "--http", "localhost")
    assert bad.returncode == 2 and "http must be HOST:PORT" in bad.stderr
    bad = run_daemon_expecting_failure(tmp_path, "--http", "example.com:80")
    assert bad.returncode == 2 and "not an IP address" in bad.stderr


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def token_file(tmp: Path, token: str) -> Path:
    path = tmp / "http.token"
    new = tmp / "http.token.new"
    new.write_text(token + "\n")
    new.replace(path)  # a new inode, as state.write_atomic makes
    return path


def test_dashboard_sessions_are_random_expire_and_are_never_the_token(tmp_path: Path) -> None:
    token = "t" * 43
    clock = FakeClock()
    secrets = LoopbackSecrets(token_file(tmp_path, token), token, ttl_s=100, clock=clock)
    one, two = secrets.open_session(), secrets.open_session()
    assert len({one.id, two.id, one.control_key, two.control_key, token}) == 5
    assert secrets.session(one.id) == one and secrets.session(token) is None
    assert not secrets.is_token(one.id) and secrets.is_token(token)
    clock.now += 99
    assert secrets.session(two.id) == two
    clock.now += 1
    assert secrets.session(one.id) is None and secrets.session(two.id) is None  # fixed lifetime, not sliding


def test_a_new_token_in_the_file_ends_every_session(tmp_path: Path) -> None:
    old = "o" * 43
    path = token_file(tmp_path, old)
    secrets = LoopbackSecrets(path, old)
    session = secrets.open_session()
    token_file(tmp_path, "short")  # hand-edited into something guessable: not taken
    assert secrets.is_token(old) and secrets.session(session.id) == session
    token_file(tmp_path, "n" * 43)
    assert secrets.session(session.id) is None
    assert not secrets.is_token(old) and secrets.is_token("n" * 43)
    path.unlink()  # gone: the token in memory stays (the next start makes a new one)
    assert secrets.is_token("n" * 43)


def test_logins_beyond_the_cap_push_out_the_oldest_session(tmp_path: Path) -> None:
    clock = FakeClock()
    secrets = LoopbackSecrets(token_file(tmp_path, "t" * 43), "t" * 43, max_sessions=3, clock=clock)
    sessions = []
    for _ in range(4):
        sessions.append(secrets.open_session())
        clock.now += 1
    assert secrets.session(sessions[0].id) is None
    assert all(secrets.session(s.id) == s for s in sessions[1:])
