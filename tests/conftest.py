"""Shared fixtures: short temp dirs, generated demo data, and reaping of spawned process groups."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dirs import short_dir


@pytest.fixture(scope="session", autouse=True)
def no_implicit_event_loop() -> None:
    """Stop asyncio from making a main-thread event loop behind our back.

    hivemind's MPFuture calls ``asyncio.get_event_loop()`` when created; from the test
    process's main thread (an in-process bootstrap DHT) that silently creates a loop
    nobody closes, and the garbage collector later reports it, and its sockets, as
    ResourceWarnings inside whichever test happens to be running. Once
    ``set_event_loop`` has been called, asyncio raises instead, which MPFuture handles.
    """
    asyncio.set_event_loop(None)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path (p2pd's unix sockets and our own paths stay well under 108 bytes)."""
    with short_dir() as path:
        yield path


@pytest.fixture(scope="session")
def demo_cache() -> Iterator[Path]:
    """A cache dir holding the generated demo shards, made once per test session."""
    from hivemindd.trainer.demo_data import ensure_demo_shards

    with short_dir("hmt-cache-") as path:
        ensure_demo_shards(path)
        yield path


@pytest.fixture(scope="module")
def bootstrap() -> Iterator[list[str]]:
    """A DHT node (its own process) that trainers join through, as they would the host DHT."""
    import hivemind

    dht = hivemind.DHT(start=True)
    try:
        yield [str(m) for m in dht.get_visible_maddrs()]
    finally:
        dht.shutdown()


@pytest.fixture
def process_groups() -> Iterator[list[int]]:
    """Register process group ids here; whatever is still alive at teardown is SIGKILLed."""
    groups: list[int] = []
    yield groups
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


@pytest.fixture
def gcs(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """A running fake-gcs-server with the bucket ``test-bucket``; STORAGE_EMULATOR_HOST points at it."""
    from tests.gcs_emulator import GcsEmulator

    with short_dir("hmt-gcs-") as root:
        emulator = GcsEmulator(root).start()
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
        emulator.create_bucket("test-bucket")
        yield emulator
        emulator.stop()
