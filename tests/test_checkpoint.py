"""Checkpoints: round trip, fallback to previous.pt, and writes interrupted at any point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from hivemindd.trainer.checkpoint import LATEST, PREVIOUS, load_latest, save_checkpoint


def payload(step: int) -> dict[str, Any]:
    return {
        "model": {"weight": torch.full((4, 3), float(step))},
        "optimizer": {"state": {"local_epoch": step // 10}, "param_groups": [{"lr": 0.1}]},
        "scheduler": None,
        "step": step,
        "samples": step * 32,
        "epoch": step // 10,
        "rng": {"torch": torch.get_rng_state(), "python": (3, tuple(range(5)), None)},
        "spec_fingerprint": "abc",
    }


class Unpicklable:
    def __reduce__(self) -> Any:
        raise RuntimeError("disk full, say")


def test_round_trip(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, payload(20))
    assert path == tmp_path / LATEST
    loaded = load_latest(tmp_path)
    assert loaded.path == tmp_path / LATEST
    assert loaded.payload is not None
    assert loaded.payload["step"] == 20 and loaded.payload["samples"] == 640
    assert torch.equal(loaded.payload["model"]["weight"], torch.full((4, 3), 20.0))
    assert loaded.payload["rng"]["python"] == (3, tuple(range(5)), None)


def test_second_save_keeps_the_first_as_previous(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, payload(10))
    save_checkpoint(tmp_path, payload(20))
    assert torch.load(tmp_path / PREVIOUS, weights_only=True)["step"] == 10
    loaded = load_latest(tmp_path)
    assert loaded.payload is not None and loaded.payload["step"] == 20


def test_nothing_to_load(tmp_path: Path) -> None:
    loaded = load_latest(tmp_path)
    assert loaded.payload is None and loaded.path is None
    assert loaded.problems == [f"{LATEST}: missing", f"{PREVIOUS}: missing"]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_damaged_latest_falls_back_to_previous(tmp_path: Path, damage: str) -> None:
    save_checkpoint(tmp_path, payload(10))
    save_checkpoint(tmp_path, payload(20))
    latest = tmp_path / LATEST
    data = latest.read_bytes()
    latest.write_bytes({"garbage": b"not a checkpoint" * 10, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    loaded = load_latest(tmp_path)
    assert loaded.path == tmp_path / PREVIOUS
    assert loaded.payload is not None and loaded.payload["step"] == 10
    assert len(loaded.problems) == 1 and loaded.problems[0].startswith(f"{LATEST}: unreadable")


def test_a_dict_that_is_not_a_checkpoint_is_skipped(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, payload(10))
    save_checkpoint(tmp_path, payload(20))
    torch.save({"hello": 1}, tmp_path / LATEST)
    loaded = load_latest(tmp_path)
    assert loaded.payload is not None and loaded.payload["step"] == 10
    assert "missing" in loaded.problems[0]


def test_crash_between_renames_leaves_previous_usable(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, payload(10))
    save_checkpoint(tmp_path, payload(20))
    # The instant after latest.pt became previous.pt and before the temp file became latest.pt.
    (tmp_path / LATEST).replace(tmp_path / PREVIOUS)
    loaded = load_latest(tmp_path)
    assert loaded.path == tmp_path / PREVIOUS
    assert loaded.payload is not None and loaded.payload["step"] == 20


def test_both_damaged_loads_nothing(tmp_path: Path) -> None:
    (tmp_path / LATEST).write_bytes(b"x")
    (tmp_path / PREVIOUS).write_bytes(b"y")
    loaded = load_latest(tmp_path)
    assert loaded.payload is None
    assert all("unreadable" in problem for problem in loaded.problems)


def test_failed_write_never_replaces_latest(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, payload(10))
    before = (tmp_path / LATEST).read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, {**payload(20), "poison": Unpicklable()})
    assert (tmp_path / LATEST).read_bytes() == before
    assert not (tmp_path / PREVIOUS).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST]  # no temp file left behind


def test_temp_file_of_a_killed_writer_is_ignored_and_cleaned(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, payload(10))
    # What a SIGKILL in the middle of torch.save leaves: a partial temp file next to latest.pt.
    whole = (tmp_path / LATEST).read_bytes()
    stale = tmp_path / f".{LATEST}.k1ll3d.tmp"
    stale.write_bytes(whole[:100])
    loaded = load_latest(tmp_path)
    assert loaded.path == tmp_path / LATEST
    assert loaded.payload is not None and loaded.payload["step"] == 10
    save_checkpoint(tmp_path, payload(20))
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, PREVIOUS]
