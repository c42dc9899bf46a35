"""The event writer: whole JSON lines on a pipe, and silence (not a crash) once the reader is gone."""

from __future__ import annotations

import json
import os

import pytest

from hivemindd.trainer.events import EventWriter


def test_events_are_json_lines() -> None:
    read_fd, write_fd = os.pipe()
    try:
        events = EventWriter(write_fd)
        events.started(peer_id="Qm1", pid=42, maddrs=["/ip4/127.0.0.1/tcp/1"])
        events.progress(step=3, epoch=1, loss=float("nan"), samples_per_s=10.5, lr=0.1, samples=96, shards_failed=2,
                        swarm_peers=3)
        events.stopped(step=3, checkpoint_step=3)
        lines = os.read(read_fd, 65536).decode().splitlines()
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert [json.loads(line) for line in lines] == [
        {"type": "started", "peer_id": "Qm1", "pid": 42, "maddrs": ["/ip4/127.0.0.1/tcp/1"]},
        {"type": "progress", "step": 3, "epoch": 1, "loss": None, "samples_per_s": 10.5, "lr": 0.1, "samples": 96,
         "shards_failed": 2, "swarm_peers": 3},
        {"type": "stopped", "step": 3, "checkpoint_step": 3},
    ]


def test_a_gone_reader_silences_the_writer() -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    try:
        events = EventWriter(write_fd)
        events.error("first")  # EPIPE: swallowed
        events.error("second")  # no longer even tried
    finally:
        os.close(write_fd)


def test_no_fd_means_no_events() -> None:
    EventWriter(None).checkpoint(step=1, epoch=0, path="/x")


def test_a_closed_fd_is_refused_at_start() -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    os.close(write_fd)
    with pytest.raises(OSError):
        EventWriter(write_fd)
