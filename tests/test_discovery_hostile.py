"""A writer of the shared discovery folder against this daemon (issue 11, items 1, 2, 4 and 15).

Whoever can write the store must not make the daemon delete or write files
outside it, hang it with special files, keep a record fresh forever, or make a
listing or the log grow without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from hivemindd.discovery import file as file_backend
from hivemindd.discovery.agent import DiscoveryAgent
from hivemindd.discovery.backend import MAX_LISTED_OBJECTS, DiscoveryError
from hivemindd.discovery.file import FileBackend
from tests.test_discovery import PEER_A, PEER_B, Capture, record

RACE_S = 20.0  # how long the attacker swaps folders under a working agent
# Names a peer id could have (base58), for bait and victims.
PEER_NAMES = [f"Qm{c}" + PEER_B[3:] for c in "abcdefghij"]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def make_agent(root: Path, ttl: float = 10.0) -> tuple[DiscoveryAgent, Capture]:
    capture = Capture()
    agent = DiscoveryAgent(FileBackend(root.as_uri()), describe=lambda: record(PEER_A), on_new_peers=capture,
                           heartbeat_s=1.0, ttl_s=ttl)
    return agent, capture


def within(seconds: float, fn: Callable[[], Any], release: Callable[[], None] = lambda: None) -> Any:
    """``fn()`` in a daemon thread; fails the test (after ``release`` unblocks it) if it takes longer."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        release()
        thread.join(10)
        pytest.fail(f"still blocked after {seconds} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def release_fifo(*paths: Path) -> None:
    """Open each FIFO for writing and close it: a reader blocked in open() or read() gets EOF."""
    for path in paths:
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def make_exchange() -> Callable[[Path, Path], None]:
    """Swap two names atomically (renameat2 RENAME_EXCHANGE), or as three renames where that is missing."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2

    def atomic(a: Path, b: Path) -> None:
        if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def three_renames(a: Path, b: Path) -> None:
        spare = a.with_name(".swap")
        os.rename(a, spare)
        os.rename(b, a)
        os.rename(spare, b)

    return atomic if renameat2 is not None else three_renames


@contextlib.contextmanager
def swapping(a: Path, b: Path, between: Callable[[], None] = lambda: None) -> Iterator[list[int]]:
    """Swap ``a`` and ``b`` in a loop on another thread while the block runs; yields [swaps done]."""
    exchange = make_exchange()
    stop = threading.Event()
    done = [0]

    def loop() -> None:
        while not stop.is_set():
            between()
            exchange(a, b)
            done[0] += 1

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield done
    finally:
        stop.set()
        thread.join(10)


# --- 1: the symlink swap race ------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_swapping_the_peers_folder_with_a_link_deletes_and_writes_nothing_outside(tmp_path: Path) -> None:
    victim = tmp_path / "victim"  # files the attacker cannot delete, named like peer records
    victim.mkdir()
    old_ns = time.time_ns() - 3600 * 10**9
    for name in PEER_NAMES:
        (victim / f"{name}.json").write_text("precious")
        os.utime(victim / f"{name}.json", ns=(old_ns, old_ns))
    before = {p.name: p.read_text() for p in victim.iterdir()}

    store = tmp_path / "store"
    peers = store / "runs/demo/peers"
    peers.mkdir(parents=True)
    decoy = store / "runs/demo/decoy"
    decoy.symlink_to(victim, target_is_directory=True)
    real_fd = os.open(peers, os.O_RDONLY | os.O_DIRECTORY)  # follows the real folder under either name

    def plant_bait() -> None:
        # Stale files with the victims' names and mtimes in the real folder, wherever it is now.
        for name in PEER_NAMES:
            with contextlib.suppress(FileExistsError):
                os.close(os.open(f"{name}.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=real_fd))
                os.utime(f"{name}.json", ns=(old_ns, old_ns), dir_fd=real_fd)

    agent = DiscoveryAgent(FileBackend(store.as_uri()), describe=lambda: record(PEER_A), on_new_peers=Capture(),
                           heartbeat_s=1.0, ttl_s=0.1)  # anything over 1 s old is collected

    async def daemon() -> tuple[int, int]:
        await agent.set_run("demo")
        ok = failed = 0
        deadline = time.monotonic() + RACE_S
        while time.monotonic() < deadline:
            try:
                await agent.heartbeat()
                ok += 1
            except Exception:  # as DiscoveryAgent.run does: this round fails, the daemon goes on
                failed += 1  # (a refused link, here)
        return ok, failed

    try:
        with structlog.testing.capture_logs() as logs, swapping(peers, decoy, plant_bait) as swaps:
            ok, failed = run(daemon())
        collected = sum(e["event"] == "discovery.collected_stale" for e in logs)
        print(f"{swaps[0]} swaps, {ok} heartbeats ok, {failed} refused, {collected} stale baits collected")
        assert {p.name: p.read_text() for p in victim.iterdir()} == before  # nothing deleted, nothing written
        assert swaps[0] > 100 and failed > 0  # the race really ran, and the agent met the link
        if peers.is_symlink():
            make_exchange()(peers, decoy)
        plant_bait()
        with structlog.testing.capture_logs() as logs:
            run(agent.heartbeat())  # the attacker gone: the same agent works, and collects the bait
        assert sum(e["event"] == "discovery.collected_stale" for e in logs) == len(PEER_NAMES)
    finally:
        os.close(real_fd)


# --- 4: special files ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_fifo_spec_is_an_error_not_a_hang(tmp_path: Path) -> None:
    (tmp_path / "runs/r").mkdir(parents=True)
    fifo = tmp_path / "runs/r/spec.json"
    os.mkfifo(fifo)
    backend = FileBackend(tmp_path.as_uri())
    with pytest.raises(DiscoveryError, match=r"runs/r/spec\.json is not a regular file"):
        within(10, lambda: run(backend.get("runs/r/spec.json")), lambda: release_fifo(fifo))
    # Seven joins used to take seven worker threads for good; now each returns at once.
    for _ in range(7):
        with pytest.raises(DiscoveryError):
            within(10, lambda: run(backend.get("runs/r/spec.json")), lambda: release_fifo(fifo))


@pytest.mark.timeout(60)
def test_a_fifo_record_is_a_bad_record_not_a_hang(tmp_path: Path) -> None:
    (tmp_path / "hosts").mkdir()
    fifo = tmp_path / f"hosts/{PEER_B}.json"
    os.mkfifo(fifo)
    agent = DiscoveryAgent(FileBackend(tmp_path.as_uri()), describe=lambda: record(PEER_A), on_new_peers=Capture(),
                           heartbeat_s=1.0, ttl_s=10.0)
    with structlog.testing.capture_logs() as logs:
        within(10, lambda: run(agent.heartbeat()), lambda: release_fifo(fifo))
    [bad] = [e for e in logs if e["event"] == "discovery.bad_record"]
    assert bad["key"] == f"hosts/{PEER_B}.json" and "not a regular file" in bad["reason"]
    assert agent.peers() == [] and fifo.exists()


@pytest.mark.timeout(60)
def test_a_record_that_turns_into_a_fifo_between_listing_and_reading_never_hangs_a_listing(tmp_path: Path) -> None:
    (tmp_path / "hosts").mkdir()
    name = tmp_path / f"hosts/{PEER_B}.json"
    name.write_bytes(record(PEER_B).to_json())
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    backend = FileBackend(tmp_path.as_uri())
    listings = 0
    with swapping(name, fifo) as swaps:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            listed = within(10, lambda: run(backend.list("hosts/")), lambda: release_fifo(name, fifo))
            assert [o.key for o in listed] in ([], [f"hosts/{PEER_B}.json"])  # [] while mid-swap by renames
            listings += 1
    assert listings > 10 and swaps[0] > 100  # the file really changed under the listings


# --- 2: future times; bounded listings -------------------------------------------------------------


def test_a_record_dated_in_the_future_is_ignored_not_fresh_forever(tmp_path: Path) -> None:
    (tmp_path / "hosts").mkdir()
    future = tmp_path / f"hosts/{PEER_B}.json"
    future.write_bytes(record(PEER_B).to_json())
    tomorrow = time.time() + 86400
    os.utime(future, (tomorrow, tomorrow))
    skewed_id = "QmNWyoMPLVgg6o8v7jJbUrw4x6Y4vDrcDz5V8cFHjMp6Nh"
    skewed = tmp_path / f"hosts/{skewed_id}.json"  # a file server's clock a little ahead: still fine
    skewed.write_bytes(record(skewed_id).to_json())
    soon = time.time() + file_backend.FUTURE_SKEW_S / 2
    os.utime(skewed, (soon, soon))
    agent, _ = make_agent(tmp_path)
    with structlog.testing.capture_logs() as logs:
        run(agent.heartbeat())
    assert [p["peer_id"] for p in agent.peers()] == [skewed_id]
    [bad] = [e for e in logs if e["event"] == "discovery.bad_record"]
    assert bad["key"] == f"hosts/{PEER_B}.json" and "in the future" in bad["reason"]
    assert future.exists()


def test_a_listing_reads_at_most_the_freshest_thousand_and_says_so_once(tmp_path: Path) -> None:
    folder = tmp_path / "hosts"
    folder.mkdir()
    now = time.time()
    names = [f"Qm{i:04d}".replace("0", "z") + PEER_B[6:] for i in range(MAX_LISTED_OBJECTS + 100)]
    for age, name in enumerate(names):
        (folder / f"{name}.json").write_bytes(b"{}")
        os.utime(folder / f"{name}.json", (now - age, now - age))
    backend = FileBackend(tmp_path.as_uri())
    with structlog.testing.capture_logs() as logs:
        first = run(backend.list("hosts/"))
        run(backend.list("hosts/"))
    assert sorted(o.key for o in first) == sorted(f"hosts/{n}.json" for n in names[:MAX_LISTED_OBJECTS])
    [cut] = [e for e in logs if e["event"] == "discovery.listing_truncated"]
    assert cut["prefix"] == "hosts" and "1000" in cut["reason"]
    for name in names[MAX_LISTED_OBJECTS:]:
        (folder / f"{name}.json").unlink()
    with structlog.testing.capture_logs() as logs:
        run(backend.list("hosts/"))  # fits again
        (folder / f"{names[-1]}.json").write_bytes(b"{}")
        run(backend.list("hosts/"))  # cut again: said again
    assert sum(e["event"] == "discovery.listing_truncated" for e in logs) == 1


def test_a_listing_stops_at_its_byte_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_backend, "MAX_LISTED_BYTES", 2500)
    (tmp_path / "hosts").mkdir()
    for name in PEER_NAMES:
        (tmp_path / f"hosts/{name}.json").write_bytes(b" " * 1000)
    with structlog.testing.capture_logs() as logs:
        listed = run(FileBackend(tmp_path.as_uri()).list("hosts/"))
    assert len(listed) == 3  # reads until the budget is spent, then stops
    assert [e["reason"] for e in logs if e["event"] == "discovery.listing_truncated"] == ["over 2500 bytes"]


# --- 1: what is deleted, what is followed ------------------------------------------------------------


def test_only_names_like_peer_records_are_ever_deleted(tmp_path: Path) -> None:
    folder = tmp_path / "hosts"
    folder.mkdir()
    old = time.time() - 3600
    kept = ["garbage.json", "notes.txt", "QmTooShort.json", f"{PEER_B}.json.bak"]
    for name in [*kept, f"{PEER_B}.json"]:
        (folder / name).write_bytes(b"{}")
        os.utime(folder / name, (old, old))
    agent, _ = make_agent(tmp_path)
    with structlog.testing.capture_logs() as logs:
        run(agent.heartbeat())
    assert [e["key"] for e in logs if e["event"] == "discovery.collected_stale"] == [f"hosts/{PEER_B}.json"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([*kept, f"{PEER_A}.json"])
    with pytest.raises(DiscoveryError, match="only peer records"):
        run(FileBackend(tmp_path.as_uri()).delete("hosts/garbage.json"))


def test_a_store_root_that_is_a_link_is_followed_because_the_operator_configured_it(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    backend = FileBackend(link.as_uri())
    run(backend.put(f"hosts/{PEER_A}.json", b"{}"))
    assert (real / f"hosts/{PEER_A}.json").read_bytes() == b"{}"
    # Resolved once: the real folder turning into a link later is refused, not followed.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    real.rename(tmp_path / "moved")
    real.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(DiscoveryError, match="became a symbolic link"):
        run(backend.put(f"hosts/{PEER_A}.json", b"{}"))
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("inside", ["runs", "runs/demo", "runs/demo/peers"])
def test_a_link_below_the_store_root_is_refused(tmp_path: Path, inside: str) -> None:
    store, outside = tmp_path / "store", tmp_path / "outside"
    outside.mkdir()
    target = store / inside
    target.parent.mkdir(parents=True)
    target.symlink_to(outside, target_is_directory=True)
    backend = FileBackend(store.as_uri())
    read_key = f"runs/demo/peers/{PEER_B}.json" if inside == "runs/demo/peers" else "runs/demo/spec.json"
    for attempt in (lambda: backend.put(f"runs/demo/peers/{PEER_A}.json", b"{}"),
                    lambda: backend.list("runs/demo/peers/"), lambda: backend.get(read_key),
                    lambda: backend.delete(f"runs/demo/peers/{PEER_B}.json")):
        with pytest.raises(DiscoveryError, match=f"{inside} is a symbolic link"):
            run(attempt())
    assert list(outside.iterdir()) == []


def test_linked_records_and_specs_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_bytes(record(PEER_B).to_json())
    store = tmp_path / "store"
    (store / "hosts").mkdir(parents=True)
    (store / "runs/r").mkdir(parents=True)
    (store / f"hosts/{PEER_B}.json").symlink_to(outside)
    (store / "runs/r/spec.json").symlink_to(outside)
    backend = FileBackend(store.as_uri())
    with pytest.raises(DiscoveryError, match="is a symbolic link"):
        run(backend.get("runs/r/spec.json"))
    [listed] = run(backend.list("hosts/"))
    assert listed.problem == "is a symbolic link" and listed.body == b""


def test_an_oversized_object_is_refused_not_truncated(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path.as_uri())
    assert run(backend.create("runs/r/spec.json", b"{" + b" " * 300_000 + b"}")) is True
    with pytest.raises(DiscoveryError, match="over the 262144-byte limit"):
        run(backend.get("runs/r/spec.json"))


def test_writes_leave_no_temporary_files_and_refuse_hidden_or_parent_keys(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path.as_uri())
    run(backend.put(f"hosts/{PEER_A}.json", b"1"))
    run(backend.put(f"hosts/{PEER_A}.json", b"2"))
    assert [p.name for p in (tmp_path / "hosts").iterdir()] == [f"{PEER_A}.json"]
    assert (tmp_path / f"hosts/{PEER_A}.json").read_bytes() == b"2"
    for key in ("hosts/.hidden.json", "hosts/../x.json", "/etc/passwd", "hosts//x.json"):
        with pytest.raises(DiscoveryError, match="escapes"):
            run(backend.put(key, b"x"))


# --- 15: bad records in the log ----------------------------------------------------------------------


def test_a_bad_record_that_keeps_being_rewritten_is_logged_once(tmp_path: Path) -> None:
    (tmp_path / "hosts").mkdir()
    bad = tmp_path / f"hosts/{PEER_B}.json"
    agent, _ = make_agent(tmp_path)
    with structlog.testing.capture_logs() as logs:
        for i in range(5):
            bad.write_bytes(b"not json %d" % i)
            os.utime(bad, ns=(time.time_ns() + i, time.time_ns() + i))  # a new version every heartbeat
            run(agent.heartbeat())
        bad.write_bytes(record(PEER_B).to_json())
        run(agent.heartbeat())  # good again: forgotten
        bad.write_bytes(b"broken again")
        run(agent.heartbeat())
    assert sum(e["event"] == "discovery.bad_record" for e in logs) == 2


def test_the_warned_set_holds_only_records_still_listed(tmp_path: Path) -> None:
    (tmp_path / "hosts").mkdir()
    agent, _ = make_agent(tmp_path)
    for round_ in range(3):
        files = [tmp_path / f"hosts/junk-{round_}-{i}.json" for i in range(50)]
        for f in files:
            f.write_bytes(b"junk")
        run(agent.heartbeat())
        for f in files:
            f.unlink()
    run(agent.heartbeat())
    assert len(agent._warned) == 0  # it held 150 names for good before
