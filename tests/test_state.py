"""Desired state survives restarts; a damaged state.json is named, never silently replaced."""

import json
import os
from pathlib import Path

import pytest

from hivemindd.host.state import DesiredState, load_state, save_state
from hivemindd.host.statedir import StateError, write_atomic
from hivemindd.wire.launch import HostSettings
from hivemindd.wire.protocol import check_run_id


def test_round_trip_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = DesiredState().joined("demo", HostSettings(device="cpu", batch_size=8, workers=1)).with_paused(True)
    save_state(path, state)
    assert load_state(path) == state
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_missing_file_is_the_empty_state(tmp_path: Path) -> None:
    assert load_state(tmp_path / "nope.json") == DesiredState()


@pytest.mark.parametrize("body, reason", [
    (b"{not json", "cannot read"),
    (b"[1, 2]", "not a JSON object"),
    (json.dumps({"run_id": "../etc", "host": {}}).encode(), "run_id"),
    (json.dumps({"run_id": "a", "host": {"batch_size": 0}}).encode(), "host.batch_size"),
    (json.dumps({"run_id": "a", "paused": "yes"}).encode(), "paused"),
])
def test_bad_state_file_is_named_and_kept(tmp_path: Path, body: bytes, reason: str) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(body)
    with pytest.raises(StateError, match=reason) as err:
        load_state(path)
    assert str(path) in str(err.value)
    assert path.read_bytes() == body  # nothing already saved is lost


def test_write_atomic_leaves_old_content_when_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f"
    write_atomic(path, b"old")

    def boom(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]  # no temp file left behind


@pytest.mark.parametrize("run_id, ok", [("demo", True), ("imagenet-distributed", True), ("a.b_c", True),
                                         ("", False), ("../x", False), ("a/b", False), (".hidden", False),
                                         ("x" * 65, False), (5, False)])
def test_run_ids_are_safe_path_parts(run_id: object, ok: bool) -> None:
    assert (check_run_id(run_id) is None) == ok
