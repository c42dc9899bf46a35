"""hmctl: fast, light, and clear when the daemon is not there."""

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from hivemindd.cli import main
from hivemindd.hmctl.render import render_status, render_swarm
from hivemindd.wire.protocol import EX_UNAVAILABLE


def test_unreachable_daemon_gives_one_line_and_exit_69(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--socket", str(tmp_path / "none.sock"), "status"])
    assert result.exit_code == EX_UNAVAILABLE
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "hivemindd is not running" in lines[0] and "systemctl status hivemindd" in lines[0]


def test_socket_from_environment(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["peers", "--json"], env={"HIVEMINDD_SOCKET": str(tmp_path / "env.sock")})
    assert result.exit_code == EX_UNAVAILABLE and "env.sock" in result.output


def test_hmctl_imports_nothing_heavy() -> None:
    code = ("import sys, hivemindd.cli; heavy = [m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'torchvision', 'hivemind', 'aiohttp', 'numpy')]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_teaches_the_commands() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for word in ("join", "status", "pause", "resume", "leave", "logs", "peers", "--spec"):
        assert word in result.output


def test_status_rendering_shows_crashloop_errors() -> None:
    status = {
        "peer_id": "QmA", "hostname": "h", "version": "0.1.0", "run_id": "demo", "paused": False,
        "host": {"device": "cpu", "batch_size": 8, "workers": 0}, "peers": 1,
        "discovery": {"url": "file:///d", "state": "ok", "error": None},
        "trainer": {"state": "crashloop", "since_s": 5, "retry_in_s": 290, "pid": None, "restarts": 4,
                    "step": 120, "epoch": 3, "loss": 1.5, "samples_per_s": 30.0, "checkpoint_step": 100,
                    "last_error": "data.train: no shards match /x", "error_lines": ["Traceback …", "OSError: x"]},
    }
    text = render_status(status)
    assert "crashloop" in text and "retry in 4m" in text and "no shards match" in text and "| OSError: x" in text
    assert "step 120  global step 3" in text
    assert "averaging with" not in text  # the trainer said nothing about its swarm
    status["trainer"]["swarm_peers"] = 3
    assert "swarm     averaging with 2 other peer(s)" in render_status(status)


def test_bad_pause_duration_is_refused_before_asking_the_daemon(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--socket", str(tmp_path / "none.sock"), "pause", "--for", "half an hour"])
    assert result.exit_code == 2  # a usage error, not "daemon unreachable": nothing was sent
    assert "'--for'" in result.output and "like 90s, 30m, 2h or 1h30m" in result.output


def test_status_rendering_shows_the_pause_and_the_http_listener() -> None:
    status = {
        "peer_id": "QmA", "hostname": "h", "version": "0.1.0", "run_id": "demo", "paused": True,
        "pause": {"until": None, "remaining_s": None, "after_checkpoint": True},
        "host": {"device": "cpu", "batch_size": 8, "workers": 0}, "peers": 0,
        "discovery": {"url": "file:///d", "state": "ok", "error": None},
        "http": {"url": "http://127.0.0.1:8080", "token_file": "/s/http.token"},
        "trainer": {"state": "running", "since_s": 5, "retry_in_s": None, "pid": 7, "restarts": 0, "step": None,
                    "last_error": None, "error_lines": []},
    }
    text = render_status(status)
    assert "pause     pausing after the next checkpoint" in text
    assert "http      http://127.0.0.1:8080  (bearer token in /s/http.token)" in text
    status["pause"] = None  # a daemon from before timed pauses
    assert "paused indefinitely" in render_status(status)


def test_status_and_swarm_never_say_a_bare_epoch() -> None:
    """Issue 10: "epoch" meant hivemind's global step in status and dataset epochs in the spec's milestones."""
    status = {
        "peer_id": "QmA", "hostname": "h", "version": "0.1.0", "run_id": "demo", "paused": False,
        "host": {"device": "cpu", "batch_size": 8, "workers": 0}, "peers": 1,
        "discovery": {"url": "file:///d", "state": "ok", "error": None},
        "trainer": {"state": "running", "since_s": 5, "retry_in_s": None, "pid": 7, "restarts": 0, "step": 1687,
                    "epoch": 160, "dataset_epoch": 5.12, "loss": 0.2007, "samples_per_s": 30.0,
                    "checkpoint_step": 1680, "last_error": None, "error_lines": []},
    }
    text = render_status(status)
    assert "step 1687  global step 160 (dataset epoch 5.12)  loss 0.2007" in text
    view = {"run_id": "demo", "error": None, "read_age_s": 1.0, "totals": {
        "peers": 1, "training": 1, "samples_per_s": 30.0, "global_epoch": 160, "dataset_epochs": 5.12,
        "last_milestone": 30, "eta_s": 100.0, "best_val_top1": None},
        "peers": [{"hostname": "h", "peer_id": "QmA", "activity": "training", "step": 1687, "epoch": 160,
                   "samples_per_s": 30.0, "loss": 0.2, "age_s": 1.0}]}
    swarm = render_swarm(view)
    assert "GLOBAL STEP" in swarm and "global step 160  dataset epoch 5.12 of 30 (last milestone)" in swarm
    for rendered in (text, swarm):
        bare = [w for w in rendered.lower().replace("dataset epoch", "").split() if w.startswith("epoch")]
        assert bare == [], rendered


def test_status_labels_the_previous_attempts_error_as_such() -> None:
    status = {
        "peer_id": "QmA", "hostname": "h", "version": "0.1.0", "run_id": "demo", "paused": False,
        "host": {"device": "cpu", "batch_size": 8, "workers": 0}, "peers": 1,
        "discovery": {"url": "file:///d", "state": "ok", "error": None},
        "trainer": {"state": "starting", "since_s": 1, "retry_in_s": None, "pid": 7, "restarts": 1, "step": None,
                    "last_error": None, "previous_error": "trainer hung: no progress for 900 s", "error_lines": []},
    }
    text = render_status(status)
    assert "restarted after: trainer hung" in text and "error     " not in text


class _FakeDaemon:
    """Answers every request on a unix socket with ``[]`` (HTTP 200), in a thread; records nothing."""

    def __init__(self, path: Path) -> None:
        import socket
        import threading

        self.path = path
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(4)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with conn:
                conn.recv(1 << 16)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n[]")

    def close(self) -> None:
        self._server.close()


def test_state_dir_flag_finds_the_daemons_socket(short_tmp: Path) -> None:
    root = short_tmp  # the socket path must stay short
    (root / "state").mkdir()
    daemon = _FakeDaemon(root / "state" / "hivemindd.sock")
    try:
        result = CliRunner().invoke(main, ["--state-dir", str(root / "state"), "peers", "--json"])
        assert result.exit_code == 0, result.output
        assert result.output.strip() == "[]"
        # The flag beats the environment, whichever variable it is; --socket beats --state-dir.
        env = {"HIVEMINDD_SOCKET": str(root / "other.sock"), "HIVEMINDD_STATE_DIR": str(root / "other")}
        result = CliRunner().invoke(main, ["--state-dir", str(root / "state"), "peers", "--json"], env=env)
        assert result.exit_code == 0, result.output
        result = CliRunner().invoke(main, ["--state-dir", str(root / "state"), "--socket", str(root / "x.sock"),
                                           "peers"])
        assert result.exit_code == EX_UNAVAILABLE and "x.sock" in result.output
        result = CliRunner().invoke(main, ["peers", "--json"], env={"HIVEMINDD_STATE_DIR": str(root / "state")})
        assert result.exit_code == 0 and result.output.strip() == "[]", result.output
    finally:
        daemon.close()


def test_help_names_the_state_dir_flag_and_its_variable() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert "--state-dir" in result.output and "HIVEMINDD_STATE_DIR" in result.output


def test_a_socket_path_too_long_for_unix_sockets_says_what_to_do(tmp_path: Path) -> None:
    long_dir = tmp_path / ("d" * 120)
    result = CliRunner().invoke(main, ["--state-dir", str(long_dir), "status"])
    assert result.exit_code == EX_UNAVAILABLE
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "AF_UNIX" not in lines[0], lines
    assert "longer than a unix socket address may be" in lines[0] and "shorter --state-dir or --socket" in lines[0]
    result = CliRunner().invoke(main, ["--socket", str(long_dir / "s.sock"), "peers"])
    assert result.exit_code == EX_UNAVAILABLE and "longer than a unix socket address" in result.output
