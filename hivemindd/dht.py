"""The host's DHT node: a stable identity, and the doorway trainers bootstrap through."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import structlog

from hivemindd.state import write_atomic

STALE_WAIT_S = 5.0

log = structlog.get_logger(__name__)


def ensure_identity(path: Path) -> str:
    """Create the node's private key (mode 0600) unless it exists; returns the peer id it gives."""
    from hivemind.p2p import PeerID
    from hivemind.proto import crypto_pb2
    from hivemind.utils.crypto import RSAPrivateKey

    if path.exists():
        os.chmod(path, 0o600)
    else:
        key = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=RSAPrivateKey().to_bytes())
        write_atomic(path, key.SerializeToString(), mode=0o600)
    return str(PeerID.from_identity(path.read_bytes()).to_base58())


async def _connect(_dht: Any, node: Any, peers: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
    """Runs inside the DHT process: dial each peer and add it to the routing table; returns who answered."""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    async def one(peer_id: str, maddrs: Sequence[str]) -> bool:
        pid = PeerID.from_base58(peer_id)
        try:
            await asyncio.wait_for(node.p2p._client.connect(pid, [Multiaddr(m) for m in maddrs]), timeout=10)
            return await node.protocol.call_ping(pid) is not None
        except Exception:
            return False

    results = await asyncio.gather(*(one(pid, maddrs) for pid, maddrs in peers))
    return [pid for (pid, _), ok in zip(peers, results, strict=True) if ok]


def end_stale_dht(record: Path) -> list[int]:
    """End the DHT process and p2pd that a daemon killed with SIGKILL left running; returns their pids.

    hivemind's DHT is a forked child with p2pd below it; neither notices its daemon die.
    ``record`` lists (pid, start time) of each, written once the DHT is up; a recycled
    pid has another start time and is left alone.
    """
    try:
        entries = [(int(e["pid"]), float(e["create_time"])) for e in json.loads(record.read_bytes())]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("dht.bad_pid_record", path=str(record))
        record.unlink(missing_ok=True)
        return []
    alive = []
    for pid, created in entries:
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) < 1:
                alive.append(proc)
        except psutil.Error:
            continue
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=STALE_WAIT_S)
    if alive:
        log.warning("dht.ended_stale", pids=[p.pid for p in alive])
    record.unlink(missing_ok=True)
    return [p.pid for p in alive]


def record_dht_processes(record: Path, dht_pid: int) -> None:
    """Write (pid, start time) of the DHT process and everything below it (p2pd) for end_stale_dht."""
    root = psutil.Process(dht_pid)
    procs = [root, *root.children(recursive=True)]
    entries = []
    for proc in procs:
        try:
            entries.append({"pid": proc.pid, "create_time": proc.create_time(), "name": proc.name()})
        except psutil.Error:
            continue
    write_atomic(record, json.dumps(entries).encode(), mode=0o600)


class HostDHT:
    """Owns one ``hivemind.DHT`` process (and its p2pd) for the daemon's lifetime."""

    def __init__(
        self,
        identity_path: Path,
        host_maddrs: Sequence[str],
        announce_maddrs: Sequence[str],
        pid_record: Path | None = None,
    ) -> None:
        self.identity_path = identity_path
        self.pid_record = pid_record  # where the DHT's process ids go, for the next daemon to clean up
        self.host_maddrs = list(host_maddrs)
        self.announce_maddrs = list(announce_maddrs)
        self._dht: Any = None
        self.peer_id = ensure_identity(identity_path)
        self.maddrs: list[str] = []

    def start(self, initial_peers: Sequence[str]) -> None:
        """Blocking: start the DHT process. Call before installing signal handlers (it forks)."""
        import hivemind

        self._dht = hivemind.DHT(
            initial_peers=list(initial_peers),
            host_maddrs=self.host_maddrs,
            announce_maddrs=self.announce_maddrs or None,
            identity_path=str(self.identity_path),
            # The state-dir lock guarantees nobody else holds this key; the check costs seconds.
            check_if_identity_free=False,
            # Stale discovery records must not stop the daemon: it retries through the agent.
            ensure_bootstrap_success=False,
            start=True,
        )
        self.maddrs = [str(m) for m in self._dht.get_visible_maddrs()]
        if self.pid_record is not None:
            record_dht_processes(self.pid_record, self._dht.pid)
        log.info("dht.started", peer_id=self.peer_id, maddrs=self.maddrs, bootstrap_peers=len(initial_peers))

    @property
    def alive(self) -> bool:
        return self._dht is not None and self._dht.is_alive()

    async def connect(self, peers: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
        """Dial newly discovered peers so that separate islands merge; returns the peer ids that answered."""
        if not self.alive or not peers:
            return []
        call = partial(_connect, peers=[(pid, list(m)) for pid, m in peers])
        answered: list[str] = await asyncio.to_thread(self._dht.run_coroutine, call)
        return answered

    async def store_record(self, key: str, subkey: str, value: dict[str, Any], expiration: float) -> bool:
        """Store ``value`` under ``key``/``subkey`` until ``expiration`` (unix time); True if some node took it."""
        if not self.alive:
            raise RuntimeError("the host DHT is not running")
        stored = await asyncio.to_thread(self._dht.store, key, value, expiration, subkey=subkey)
        return bool(stored)

    async def get_records(self, key: str) -> dict[str, Any]:
        """Every unexpired ``subkey → value`` under ``key`` (a dictionary value, as hivemind's progress tracker uses)."""
        if not self.alive:
            raise RuntimeError("the host DHT is not running")
        found = await asyncio.to_thread(self._dht.get, key, True)  # latest=True: ask beyond the first answer
        if found is None or not isinstance(found.value, dict):
            return {}
        return {str(subkey): item.value for subkey, item in found.value.items()}

    def stop(self) -> None:
        if self._dht is not None:
            self._dht.shutdown()
            self._dht.join(timeout=10)
            self._dht = None
            if self.pid_record is not None:
                self.pid_record.unlink(missing_ok=True)
