"""hmctl never prints what peers, records or specs say raw (issue 11 item 8): escapes and CR/LF are shown as text."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
from click.testing import CliRunner

from hivemindd.cli import main
from hivemindd.hmctl import client, commands
from hivemindd.hmctl.render import printable, render_prediction, render_status, render_swarm

HOSTILE = "evil\x1b[2J\x1b]0;pwned\x07\r\nINFO forged line\u202e"


def assert_inert(text: str) -> None:
    for ch in ("\x1b", "\x07", "\r", "\u202e"):
        assert ch not in text, repr(ch)
    assert "INFO forged line" not in text.splitlines()  # never a line of its own


def test_printable_escapes_control_and_bidi_characters() -> None:
    assert printable("plain name-1.local") == "plain name-1.local"
    assert printable("a\x1b[31mb\r\nc\td\u202ee\x00\x9b") == "a\\x1b[31mb\\r\\nc\\td\\u202ee\\x00\\x9b"
    assert printable({"k\n": ["x\x1b", 3, None]}) == {"k\\n": ["x\\x1b", 3, None]}
    assert printable("naïve 東京 😀") == "naïve 東京 😀"  # printable text is left alone


def _status() -> dict[str, Any]:
    return {
        "peer_id": "QmA", "hostname": HOSTILE, "version": "0.1.0", "run_id": "demo", "paused": False,
        "host": {"device": HOSTILE, "batch_size": 8, "workers": 0}, "peers": 1,
        "discovery": {"url": "file:///d", "state": "degraded", "error": HOSTILE},
        "trainer": {"state": "crashloop", "since_s": 5, "retry_in_s": 290, "pid": None, "restarts": 4,
                    "step": 120, "epoch": 3, "loss": 1.5, "samples_per_s": 30.0, "checkpoint_step": 100,
                    "last_error": "data.train: " + HOSTILE, "error_lines": [HOSTILE]},
    }


def test_status_shows_hostile_strings_inert() -> None:
    text = render_status(_status())
    assert_inert(text)
    assert "evil\\x1b[2J" in text and "\\r\\nINFO forged line" in text


def test_the_swarm_table_shows_hostile_peers_inert() -> None:
    peer = {"hostname": HOSTILE, "peer_id": "Qm" + "x" * 40, "activity": HOSTILE, "step": 1, "epoch": 1,
            "samples_per_s": 1.0, "loss": 1.0, "val_top1": None, "best_val_top1": None, "device": HOSTILE,
            "age_s": 3}
    view = {"run_id": "demo", "peers": [peer], "error": HOSTILE,
            "totals": {"training": 1, "peers": 1, "samples_per_s": 1.0, "global_epoch": 1, "dataset_epochs": 0.1,
                       "last_milestone": None, "eta_s": None, "best_val_top1": None}}
    text = render_swarm(view)
    assert_inert(text)
    assert len(text.splitlines()) == len(render_swarm({**view, "peers": [{**peer, "hostname": "h", "activity": "a",
                                                                             "device": "d"}],
                                                       "error": "e"}).splitlines())


def test_prediction_labels_are_inert() -> None:
    result = {"checkpoint": "/c/best.pt", "step": 1, "arch": "resnet18",
              "results": [{"image": "x.png", "top": [{"index": 0, "probability": 0.5, "label": HOSTILE}]},
                          {"image": HOSTILE, "error": HOSTILE}]}
    assert_inert(render_prediction(result))


class FakeClient(client.Client):
    answers: ClassVar[dict[str, Any]] = {}

    def call(self, name: str, body: dict[str, Any] | None = None, query: str = "") -> Any:
        return self.answers[name]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> type[FakeClient]:
    monkeypatch.setattr(commands, "Client", FakeClient)
    return FakeClient


def test_hmctl_peers_and_logs_print_hostile_records_inert(fake: type[FakeClient], tmp_path: Path) -> None:
    fake.answers = {
        "peers": [{"peer_id": "QmP", "age_s": 2.0, "activity": HOSTILE, "state": HOSTILE, "hostname": HOSTILE,
                   "maddrs": [HOSTILE]}],
        "logs": {"lines": [HOSTILE], "entries": [{"source": "trainer", "line": HOSTILE}], "next": 1},
    }
    socket = ["--socket", str(tmp_path / "s.sock")]
    for command in (["peers"], ["logs"]):
        result = CliRunner().invoke(main, socket + command)
        assert result.exit_code == 0, result.output
        assert_inert(result.output)
        assert "evil\\x1b[2J" in result.output
    json_out = CliRunner().invoke(main, [*socket, "peers", "--json"]).output
    assert "\x1b" not in json_out and "\\u001b" in json_out  # JSON escapes them itself, losslessly


def test_an_error_message_from_the_daemon_is_inert(fake: type[FakeClient], tmp_path: Path) -> None:
    def refuse(self: FakeClient, name: str, body: dict[str, Any] | None = None, query: str = "") -> Any:
        raise client.ApiError(400, {"error": {"message": "spec: " + HOSTILE}})

    fake.call = refuse  # type: ignore[method-assign]
    result = CliRunner().invoke(main, ["--socket", str(tmp_path / "s.sock"), "status"])
    assert result.exit_code == 1
    assert_inert(result.output)
