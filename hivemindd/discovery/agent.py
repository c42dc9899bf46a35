"""The discovery loop: announce this host, read the others, forget the dead.

Every heartbeat (jittered) the agent rewrites its own record, lists the records
of its scope (the run it joined, or the host list when not joined), keeps the
fresh ones, tells the DHT about newcomers and deletes records far past the TTL.
When the store fails it keeps the peers it knows, retries with capped backoff
and reports ``degraded``.

Newcomers are dialed in shuffled batches of at most ``DIAL_BATCH``. A peer that
does not answer (its record is fresh but its node is not up yet, or a dial timed
out) is dialed again with backoff and jitter, and the agent wakes early to re-list
and retry, so a host whose bootstrap peers were all unreachable still joins within
seconds of one answering. A peer that answered is not dialed again unless its
addresses change.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import structlog

from hivemindd.discovery.backend import DiscoveryBackend, DiscoveryError
from hivemindd.discovery.records import PeerRecord, RecordError, is_record_name

log = structlog.get_logger(__name__)

GC_TTL_MULTIPLE = 10  # a record this many TTLs old belongs to a host that is gone for good
DIAL_BATCH = 8  # peers dialed at once, as a bootstrap list
MAX_BATCHES_IN_FLIGHT = 2
MIN_WAKE_S = 1.0  # the earliest a failed dial is retried (and the store re-listed)
MAX_REDIAL_HEARTBEATS = 4  # an unreachable peer is retried at least this often, in heartbeats

# Dial callback: the peer ids that answered, or None when the dialer cannot tell (taken as all).
DialPeers = Callable[[list[PeerRecord]], Awaitable[Collection[str] | None]]


def peers_prefix(run_id: str | None) -> str:
    return f"runs/{run_id}/peers/" if run_id else "hosts/"


def spec_key(run_id: str) -> str:
    return f"runs/{run_id}/spec.json"


@dataclass(frozen=True)
class KnownPeer:
    record: PeerRecord
    age_s: float  # as judged by the store when listed
    listed_at: float  # our monotonic clock


@dataclass
class _Dial:
    """Where dialing one peer stands."""

    maddrs: tuple[str, ...]
    answered: bool = False
    in_flight: bool = False
    failures: int = 0
    next_try: float = 0.0


class DiscoveryAgent:
    """Owns this host's record in the store and the list of fresh peers."""

    def __init__(
        self,
        backend: DiscoveryBackend,
        *,
        describe: Callable[[], PeerRecord],
        on_new_peers: DialPeers,
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
        self._warned: set[str] = set()  # keys of bad records logged already; only keys still listed
        self._wake = asyncio.Event()  # heartbeat now
        self._replan = asyncio.Event()  # a dial failed: recompute when to wake
        self._error: str | None = None
        self._failures = 0
        self._last_ok: float | None = None
        self._dials: dict[str, _Dial] = {}
        self._dialing: set[asyncio.Task[None]] = set()  # batches of dials in flight
        self._first_round = asyncio.Event()  # the first heartbeat ended, well or not: status means something

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
                dial = self._dials.get(r.peer_id)
                reachable = None if dial is None or not (dial.answered or dial.failures) else dial.answered
                out.append({"peer_id": r.peer_id, "maddrs": list(r.maddrs), "age_s": round(age, 1),
                            "hostname": r.hostname, "state": r.state, "version": r.version, "reachable": reachable})
        return sorted(out, key=lambda p: p["age_s"])

    def knows(self, peer_id: str) -> bool:
        """True for this host and for peers with a fresh record: who may count in the swarm view."""
        return peer_id == self._describe().peer_id or any(p["peer_id"] == peer_id for p in self.peers())

    def reachable_peers(self) -> list[dict[str, Any]]:
        """Fresh peers whose node answered this host's dial: safe bootstrap peers for a trainer."""
        return [p for p in self.peers() if p["reachable"]]

    def forget_dials(self) -> None:
        """Dial every peer again (this host's DHT node was restarted and knows nobody)."""
        self._dials = {}
        self._wake.set()

    async def first_round(self, timeout_s: float) -> bool:
        """Wait (bounded) until the first heartbeat has ended; False if it is still running."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._first_round.wait()
        except TimeoutError:
            return False
        return True

    def status(self) -> dict[str, Any]:
        state = "starting" if self._last_ok is None and self._error is None else "degraded" if self._error else "ok"
        last_ok = None if self._last_ok is None else round(self._clock() - self._last_ok, 1)
        return {"url": self.backend.url, "state": state, "error": self._error, "last_ok_s_ago": last_ok,
                "failures": self._failures}

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
            for task in self._dialing:
                task.cancel()
            await asyncio.gather(*self._dialing, return_exceptions=True)

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
            self._first_round.set()
            self._wake.clear()
            await self._sleep(self._clock() + delay)

    async def _sleep(self, heartbeat_at: float) -> None:
        """Until the next heartbeat, an explicit wake, or a failed dial falling due (re-list and retry)."""
        while True:
            self._replan.clear()
            # While the store is down only its own backoff counts: dials due meanwhile wait for it.
            redial_in = self._until_redial() if self._error is None else float("inf")
            wake_at = min(heartbeat_at, self._clock() + redial_in)
            remaining = wake_at - self._clock()
            if remaining <= 0:
                return
            waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(self._replan.wait())]
            try:
                # asyncio.wait, not wait_for: see Supervisor._wait_changed
                await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waits:
                    waiter.cancel()
            if self._wake.is_set() or self._clock() >= wake_at:
                return

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
        self._dial_due()

    def _dial_due(self) -> None:
        """Dial (in the background: never delaying the heartbeat) fresh peers that have not answered yet."""
        now = self._clock()
        fresh = {pid: known.record for pid, known in self._peers.items()}
        self._dials = {pid: d for pid, d in self._dials.items() if pid in fresh}
        for pid, record in fresh.items():
            dial = self._dials.get(pid)
            if dial is None or (dial.maddrs != record.maddrs and not dial.in_flight):
                self._dials[pid] = _Dial(record.maddrs)  # new, or restarted on other addresses
        due = [fresh[pid] for pid, d in self._dials.items() if not (d.answered or d.in_flight) and d.next_try <= now]
        random.shuffle(due)
        # A bounded number of batches in flight: a store full of records must not become thousands
        # of simultaneous connections (the rest are due next round, which a finished batch brings forward).
        room = max(0, MAX_BATCHES_IN_FLIGHT - len(self._dialing))
        for start in range(0, min(len(due), room * DIAL_BATCH), DIAL_BATCH):
            batch = due[start:start + DIAL_BATCH]
            for record in batch:
                self._dials[record.peer_id].in_flight = True
            task = asyncio.create_task(self._dial(batch), name="discovery-connect")
            self._dialing.add(task)
            task.add_done_callback(self._dialing.discard)

    async def _dial(self, records: list[PeerRecord]) -> None:
        answered: Collection[str] | None
        try:
            answered = await self._on_new_peers(records)
        except Exception as exc:  # a failed dial is logged and retried later; discovery goes on
            log.warning("discovery.connect_failed", error=repr(exc), peers=[r.peer_id for r in records])
            answered = ()
        ok = {r.peer_id for r in records} if answered is None else set(answered)
        now = self._clock()
        for record in records:
            dial = self._dials.get(record.peer_id)
            if dial is None:
                continue  # went stale meanwhile
            dial.in_flight = False
            if record.peer_id in ok:
                dial.answered = True
                continue
            dial.failures += 1
            backoff = min(2.0 ** dial.failures, MAX_REDIAL_HEARTBEATS * self.heartbeat_s)
            dial.next_try = now + max(MIN_WAKE_S, backoff * random.uniform(0.8, 1.2))
        missed = [r.peer_id for r in records if r.peer_id not in ok]
        if missed:  # why each failed is the dialer's to say (once per peer and reason)
            log.debug("discovery.dial_retry_later", peers=missed, answered=len(records) - len(missed))
        self._replan.set()  # the loop may have to wake before its next heartbeat: a retry, or peers left undialled

    def _until_redial(self) -> float:
        """Seconds until the next dial is due, a retry or one the in-flight cap held back (never below MIN_WAKE_S)."""
        room = len(self._dialing) < MAX_BATCHES_IN_FLIGHT  # else a finishing batch wakes the loop
        pending = [d.next_try for d in self._dials.values()
                   if not (d.answered or d.in_flight) and (d.failures or room)]
        if not pending:
            return float("inf")
        return max(MIN_WAKE_S, min(pending) - self._clock())

    async def _list(self) -> None:
        own_id = self._describe().peer_id
        listed_at = self._clock()
        peers: dict[str, KnownPeer] = {}
        listed = await self.backend.list(peers_prefix(self._run_id))
        for obj in listed:
            if obj.problem is None and obj.age_s > GC_TTL_MULTIPLE * self.ttl_s:
                # Only peer records are ever deleted, whatever else a writer of the store left there.
                if is_record_name(obj.key.rsplit("/", 1)[-1]) and await self.backend.delete(
                        obj.key, if_version=obj.version):
                    log.info("discovery.collected_stale", key=obj.key, age_s=round(obj.age_s))
                continue
            try:
                if obj.problem is not None:
                    raise RecordError(obj.problem)
                record = PeerRecord.from_json(obj.body)
            except RecordError as exc:
                # Once per key while it stays bad: rewriting a bad file does not log it again.
                if obj.key not in self._warned:
                    self._warned.add(obj.key)
                    log.warning("discovery.bad_record", key=obj.key, reason=str(exc))
                continue
            self._warned.discard(obj.key)
            if record.peer_id == own_id or obj.age_s > self.ttl_s:
                continue
            peers[record.peer_id] = KnownPeer(record, obj.age_s, listed_at)
        self._warned &= {obj.key for obj in listed}  # bounded by one listing
        self._peers = peers

    def _own_key(self, run_id: str | None) -> str:
        return f"{peers_prefix(run_id)}{self._describe().peer_id}.json"
