"""The discovery loop: announce this host, read the others, forget the dead.

Every heartbeat (jittered) the agent rewrites its own record, lists the records
of its scope (the run it joined, or the host list when not joined), keeps the
fresh ones, tells the DHT about newcomers and deletes records far past the TTL.
When the store fails it keeps the peers it knows, retries with capped backoff
and reports ``degraded``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from hivemindd.discovery.backend import DiscoveryBackend, DiscoveryError
from hivemindd.discovery.records import PeerRecord, RecordError

log = structlog.get_logger(__name__)

GC_TTL_MULTIPLE = 10  # a record this many TTLs old belongs to a host that is gone for good


def peers_prefix(run_id: str | None) -> str:
    return f"runs/{run_id}/peers/" if run_id else "hosts/"


def spec_key(run_id: str) -> str:
    return f"runs/{run_id}/spec.json"


@dataclass(frozen=True)
class KnownPeer:
    record: PeerRecord
    age_s: float  # as judged by the store when listed
    listed_at: float  # our monotonic clock


class DiscoveryAgent:
    """Owns this host's record in the store and the list of fresh peers."""

    def __init__(
        self,
        backend: DiscoveryBackend,
        *,
        describe: Callable[[], PeerRecord],
        on_new_peers: Callable[[list[PeerRecord]], Awaitable[None]],
        heartbeat_s: float,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self._describe = describe
        self._on_new_peers = on_new_peers
        self.heartbeat_s = heartbeat_s
        self.ttl_s = ttl_s
        self._clock = clock
        self._run_id: str | None = None
        self._peers: dict[str, KnownPeer] = {}
        self._warned: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()
        self._error: str | None = None
        self._failures = 0
        self._last_ok: float | None = None
        self._telling: asyncio.Task[None] | None = None  # the dial of newcomers in flight
        self._pending: list[PeerRecord] = []

    # --- what the daemon asks -------------------------------------------------------------

    def peers(self) -> list[dict[str, Any]]:
        """Fresh peers other than this host, freshest first."""
        # While the store is unreachable nobody can refresh: ages stop at the last good listing,
        # so an outage does not look like the swarm dying.
        now = self._clock() if self._error is None or self._last_ok is None else self._last_ok
        out = []
        for known in self._peers.values():
            age = known.age_s + (now - known.listed_at)
            if age <= self.ttl_s:
                r = known.record
                out.append({"peer_id": r.peer_id, "maddrs": list(r.maddrs), "age_s": round(age, 1),
                            "hostname": r.hostname, "state": r.state, "version": r.version})
        return sorted(out, key=lambda p: p["age_s"])

    def status(self) -> dict[str, Any]:
        state = "starting" if self._last_ok is None and self._error is None else "degraded" if self._error else "ok"
        last_ok = None if self._last_ok is None else round(self._clock() - self._last_ok, 1)
        return {"url": self.backend.url, "state": state, "error": self._error, "last_ok_s_ago": last_ok}

    async def set_run(self, run_id: str | None) -> None:
        """Move this host's record to the run's folder (or back to the host list) right away."""
        if run_id == self._run_id:
            self._wake.set()
            return
        old = self._run_id
        self._run_id = run_id
        self._peers = {}
        try:
            await self.backend.delete(self._own_key(old))
        except DiscoveryError as exc:
            log.warning("discovery.withdraw_failed", error=str(exc))
        self._wake.set()

    async def withdraw(self) -> None:
        """Remove this host's record: a clean shutdown leaves nothing stale behind."""
        try:
            async with asyncio.timeout(5):
                await self.backend.delete(self._own_key(self._run_id))
        except (DiscoveryError, TimeoutError) as exc:
            log.warning("discovery.withdraw_failed", error=str(exc))

    async def read_once(self) -> list[PeerRecord]:
        """One listing before the DHT exists, to find bootstrap peers; errors only logged."""
        try:
            await self._list()
        except DiscoveryError as exc:
            self._error = str(exc)
            log.warning("discovery.unreachable", error=str(exc))
        return [k.record for k in self._peers.values()]

    async def publish_spec(self, run_id: str, body: bytes) -> tuple[bool, bytes]:
        """Create the run's spec unless it exists; returns (created, the spec now published)."""
        if await self.backend.create(spec_key(run_id), body):
            return True, body
        existing = await self.backend.get(spec_key(run_id))
        return False, existing if existing is not None else body

    async def fetch_spec(self, run_id: str) -> bytes | None:
        return await self.backend.get(spec_key(run_id))

    # --- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Heartbeat until cancelled; never raises for store trouble."""
        try:
            await self._loop()
        finally:
            if self._telling is not None:
                self._telling.cancel()
                await asyncio.gather(self._telling, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            try:
                await self.heartbeat()
                delay = self.heartbeat_s * random.uniform(0.9, 1.1)
            except Exception as exc:  # the loop outlives any one bad round
                if not isinstance(exc, DiscoveryError):
                    log.exception("discovery.unexpected_error")
                self._failures += 1
                if self._error != str(exc):
                    log.warning("discovery.degraded", error=str(exc), failures=self._failures)
                self._error = str(exc)
                delay = min(self.heartbeat_s, 2.0 ** min(self._failures, 6)) * random.uniform(0.8, 1.2)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):  # not wait_for: see Supervisor._wait_changed
                    await self._wake.wait()

    async def heartbeat(self) -> None:
        record = self._describe()
        await self.backend.put(self._own_key(self._run_id), record.to_json())
        before = {pid for pid, k in self._peers.items() if k.age_s <= self.ttl_s}
        await self._list()
        if self._error is not None:
            log.info("discovery.recovered", after_failures=self._failures)
        self._error, self._failures, self._last_ok = None, 0, self._clock()
        new = [k.record for pid, k in self._peers.items() if pid not in before]
        if new:
            log.info("discovery.new_peers", peers=[r.peer_id for r in new])
        self._tell(new)

    def _tell(self, new: list[PeerRecord]) -> None:
        """Hand newcomers to the DHT in the background: dialing must never delay our heartbeat."""
        self._pending.extend(new)
        if self._pending and (self._telling is None or self._telling.done()):
            batch, self._pending = self._pending, []
            self._telling = asyncio.create_task(self._tell_safely(batch), name="discovery-connect")

    async def _tell_safely(self, records: list[PeerRecord]) -> None:
        try:
            await self._on_new_peers(records)
        except Exception as exc:  # a failed dial is logged; discovery goes on
            log.warning("discovery.connect_failed", error=repr(exc), peers=[r.peer_id for r in records])

    async def _list(self) -> None:
        own_id = self._describe().peer_id
        listed_at = self._clock()
        peers: dict[str, KnownPeer] = {}
        for obj in await self.backend.list(peers_prefix(self._run_id)):
            if obj.age_s > GC_TTL_MULTIPLE * self.ttl_s:
                if await self.backend.delete(obj.key, if_version=obj.version):
                    log.info("discovery.collected_stale", key=obj.key, age_s=round(obj.age_s))
                continue
            try:
                record = PeerRecord.from_json(obj.body)
            except RecordError as exc:
                if (obj.key, obj.version) not in self._warned:
                    self._warned.add((obj.key, obj.version))
                    log.warning("discovery.bad_record", key=obj.key, reason=str(exc))
                continue
            if record.peer_id == own_id or obj.age_s > self.ttl_s:
                continue
            peers[record.peer_id] = KnownPeer(record, obj.age_s, listed_at)
        self._peers = peers

    def _own_key(self, run_id: str | None) -> str:
        return f"{peers_prefix(run_id)}{self._describe().peer_id}.json"
