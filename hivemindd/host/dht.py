"""The host's DHT node: a stable identity, and the doorway trainers bootstrap through.

hivemind's ``DHT`` is a forked process driven through one unlocked pipe: two threads
sending at once interleave their bytes and kill it (``UnpicklingError``). Every call
into it here goes through one lock, held only while the request is sent; answers are
awaited with a deadline, so a dead or stuck DHT never pins a thread or the shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import structlog

from hivemindd.host.statedir import write_atomic

STALE_WAIT_S = 5.0
DIAL_TIMEOUT_S = 10.0  # one peer: connect and ping
CALL_TIMEOUT_S = 30.0  # any answer from the DHT process; past it the call failed
MAX_DIAL_ADDRS = 8  # addresses tried per peer: a record chose them, and each is a connection attempt
DIAL_LOG_EVERY_S = 600.0  # a peer that keeps failing for the same reason is logged again this often
SHUTDOWN_GRACE_S = 10.0
CALL_THREADS = 4  # calls into the DHT waiting at once; more queue up

log = structlog.get_logger(__name__)


class DHTUnavailable(RuntimeError):
    """The host DHT is not running, or did not answer in time."""


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


def _signer(identity_path: Path) -> Any:
    """hivemind's record signer holding the node's own identity key, so a signed record names its peer id."""
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.proto import crypto_pb2
    from hivemind.utils.crypto import RSAPrivateKey

    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": crypto_pb2.PrivateKey.FromString(identity_path.read_bytes()).data})  # as unpickled
    return RSASignatureValidator(key)


def peer_id_of_owner(owner: bytes) -> str | None:
    """The libp2p peer id of the RSA key in an ``[owner:ssh-rsa …]`` subkey, or None if it holds no such key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from hivemind.p2p import PeerID
    from hivemind.proto import crypto_pb2

    if not (owner.startswith(b"[owner:") and owner.endswith(b"]")) or len(owner) > 4096:
        return None
    try:
        public = serialization.load_ssh_public_key(owner[len(b"[owner:"):-1])
    except (ValueError, TypeError):
        return None
    if not isinstance(public, rsa.RSAPublicKey):
        return None
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = b"\x12\x20" + hashlib.sha256(encoded).digest()  # multihash: sha2-256, 32 bytes
    return str(PeerID(digest).to_base58())


def dial_addresses(maddrs: Sequence[str], loopback_ok: bool) -> list[str]:
    """What p2pd's connect takes from a record's multiaddrs: no ``/p2p/<id>`` suffix, at most MAX_DIAL_ADDRS.

    p2pd's control ``connect`` refuses an address that still names the peer
    (``length greater than remaining number of bytes in buffer``): the peer id goes
    separately. Loopback addresses reach another host only when both live on this
    machine, which only a daemon listening on loopback alone can assume.
    """
    out: list[str] = []
    for maddr in maddrs:
        base = maddr.split("/p2p/", 1)[0]
        if not loopback_ok and _is_loopback(base):
            continue
        if base and base not in out:
            out.append(base)
    return out[:MAX_DIAL_ADDRS]


def _is_loopback(maddr: str) -> bool:
    parts = maddr.split("/")
    if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
        with contextlib.suppress(ValueError):
            return ipaddress.ip_address(parts[2]).is_loopback
    return len(parts) > 2 and parts[1] in ("dns", "dns4", "dns6") and parts[2] == "localhost"


async def _connect(_dht: Any, node: Any, peers: Sequence[tuple[str, Sequence[str]]]) -> dict[str, str | None]:
    """Runs inside the DHT process: dial each peer, add it to the routing table; peer id → None, or why it failed."""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    async def one(peer_id: str, maddrs: Sequence[str]) -> str | None:
        try:
            pid = PeerID.from_base58(peer_id)
            async with asyncio.timeout(DIAL_TIMEOUT_S):
                await node.p2p._client.connect(pid, [Multiaddr(m) for m in maddrs])
                if await node.protocol.call_ping(pid) is None:
                    return "connected, but its DHT did not answer a ping"
            return None
        except TimeoutError:
            return f"no answer within {DIAL_TIMEOUT_S:.0f} s"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"[:300]

    results = await asyncio.gather(*(one(pid, maddrs) for pid, maddrs in peers))
    if any(r is None for r in results):
        # Fill the routing table beyond the peers just met, as hivemind does after bootstrapping.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(DIAL_TIMEOUT_S):
                await node.find_nearest_nodes([node.node_id])
    return {pid: reason for (pid, _), reason in zip(peers, results, strict=True)}


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


class _DialLog:
    """Says why a peer could not be dialled: once per peer, again after DIAL_LOG_EVERY_S or once it recovered.

    Not once per reason: libp2p's answer to the next try is often only "dial backoff".
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._said: dict[str, tuple[str, float]] = {}

    def report(self, results: dict[str, str | None]) -> None:
        now = self._clock()
        for peer_id, reason in results.items():
            if reason is None:
                if self._said.pop(peer_id, None) is not None:
                    log.info("dht.dial_recovered", peer_id=peer_id)
                continue
            said = self._said.get(peer_id)
            if said is None or now - said[1] >= DIAL_LOG_EVERY_S:
                self._said[peer_id] = (reason, now)
                log.info("dht.dial_failed", peer_id=peer_id, reason=reason)
            else:
                log.debug("dht.dial_failed", peer_id=peer_id, reason=reason)
        if len(self._said) > 10_000:  # peers that went away for good
            self._said.clear()


class HostDHT:
    """Owns one ``hivemind.DHT`` process (and its p2pd) for the daemon's lifetime; restarts it if it dies."""

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
        self._send_lock = threading.Lock()  # hivemind's pipe takes one sender at a time
        self._threads = ThreadPoolExecutor(max_workers=CALL_THREADS, thread_name_prefix="host-dht")
        self._signer: Any = None
        self._dial_log = _DialLog()
        self.peer_id = ensure_identity(identity_path)
        self.maddrs: list[str] = []
        self.restarts = 0
        self.last_death: str | None = None

    def start(self, initial_peers: Sequence[str] = ()) -> None:
        """Blocking: start the DHT process. Call before installing signal handlers (it forks).

        ``initial_peers`` are the operator's own (``--initial-peer``); discovered peers are
        dialled after start (``connect``), so no record in the store can keep p2pd from starting.
        """
        import hivemind
        from hivemind.p2p import P2PDaemonError

        self._signer = self._signer or _signer(self.identity_path)

        def launch(peers: Sequence[str]) -> Any:
            return hivemind.DHT(
                initial_peers=list(peers),
                host_maddrs=self.host_maddrs,
                announce_maddrs=self.announce_maddrs or None,
                identity_path=str(self.identity_path),
                record_validators=[self._signer],
                # The state-dir lock guarantees nobody else holds this key; the check costs seconds.
                check_if_identity_free=False,
                ensure_bootstrap_success=False,
                start=True,
            )

        try:
            self._dht = launch(initial_peers)
        except P2PDaemonError as exc:
            if not initial_peers:
                raise
            # p2pd refuses to start when none of its bootstrap peers answers: start alone, dial later.
            log.warning("dht.initial_peers_unreachable", error=str(exc), peers=len(initial_peers))
            self._dht = launch([])
        self.maddrs = [str(m) for m in self._dht.get_visible_maddrs()]
        if self.pid_record is not None:
            record_dht_processes(self.pid_record, self._dht.pid)
        log.info("dht.started", peer_id=self.peer_id, maddrs=self.maddrs, initial_peers=len(initial_peers))

    @property
    def alive(self) -> bool:
        return self._dht is not None and self._dht.is_alive()

    @property
    def loopback_only(self) -> bool:
        """True when this node can only be reached from this machine: then so can the peers worth dialling."""
        return bool(self.maddrs) and all(_is_loopback(m) for m in self.maddrs)

    def restart_if_dead(self) -> bool:
        """Blocking: if the DHT process died, end what is left of it and start a new one; True if it did."""
        if self._dht is None or self._dht.is_alive():
            return False
        self.last_death = f"exit code {self._dht.exitcode}"
        log.error("dht.died", exitcode=self._dht.exitcode, restarts=self.restarts)
        self._end_process()
        self.restarts += 1
        self.start([])
        return True

    async def _call(self, send: Callable[[], Any], timeout: float = CALL_TIMEOUT_S) -> Any:
        """Send one request (under the pipe lock) and await its answer within ``timeout``."""
        if not self.alive:
            raise DHTUnavailable("the host DHT is not running")

        def locked_send() -> Any:
            with self._send_lock:
                return send()

        # Threads of their own: a stuck DHT must not take the default pool that discovery's reads use.
        loop = asyncio.get_running_loop()
        future = await loop.run_in_executor(self._threads, locked_send)
        try:
            return await loop.run_in_executor(self._threads, future.result, timeout)
        except TimeoutError:
            future.cancel()
            raise DHTUnavailable(f"the host DHT did not answer within {timeout:.0f} s") from None

    async def connect(self, peers: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
        """Dial discovered peers so that separate islands merge; returns the peer ids that answered."""
        if not self.alive or not peers:
            return []
        loopback_ok = self.loopback_only
        plan = [(pid, dial_addresses(m, loopback_ok)) for pid, m in peers]
        results: dict[str, str | None] = {pid: "no address this host can dial" for pid, addrs in plan if not addrs}
        plan = [(pid, addrs) for pid, addrs in plan if addrs]
        if plan:
            call = partial(_connect, peers=plan)
            dht = self._dht
            results.update(await self._call(lambda: dht.run_coroutine(call, return_future=True),
                                            timeout=3 * DIAL_TIMEOUT_S))
        self._dial_log.report(results)
        return [pid for pid, reason in results.items() if reason is None]

    async def publish(self, key: str, value: dict[str, Any], expiration: float) -> bool:
        """Store ``value`` under ``key``, signed as this node's (subkey = its public key), until ``expiration``."""
        dht, owner = self._dht, self._signer.local_public_key
        stored = await self._call(lambda: dht.store(key, value, expiration, subkey=owner, return_future=True))
        return bool(stored)

    async def read_signed(self, key: str) -> dict[str, Any]:
        """Every unexpired signed value under ``key``, by the peer id of the key that signed it.

        The DHT checks each signature against the public key in its subkey; values under
        any other subkey (unsigned, forged) are left out here.
        """
        dht = self._dht
        found = await self._call(lambda: dht.get(key, latest=True, return_future=True))
        if found is None or not isinstance(found.value, dict):
            return {}
        out: dict[str, Any] = {}
        for subkey, item in found.value.items():
            peer_id = peer_id_of_owner(subkey) if isinstance(subkey, bytes) else None
            if peer_id is not None:
                out[peer_id] = item.value
        return out

    def stop(self) -> None:
        """Blocking: shut the DHT down, whatever state it is in (dead, stuck, or fine)."""
        self._threads.shutdown(wait=False, cancel_futures=True)
        if self._dht is None:
            return
        if self._dht.is_alive():
            # hivemind's own shutdown sends on the pipe and may wait on it: bounded, then forced.
            stopper = threading.Thread(target=self._shutdown_quietly, args=(self._dht,), daemon=True)
            stopper.start()
            stopper.join(SHUTDOWN_GRACE_S)
        self._end_process()

    def _shutdown_quietly(self, dht: Any) -> None:
        with contextlib.suppress(Exception), self._send_lock:
            dht.shutdown()

    def _end_process(self) -> None:
        """Kill whatever is left of the DHT process and the p2pd below it."""
        dht, self._dht = self._dht, None
        if dht is None:
            return
        with contextlib.suppress(Exception):
            dht.join(timeout=1)
        if self.pid_record is not None:
            end_stale_dht(self.pid_record)  # p2pd too: it does not notice its parent die
        elif dht.is_alive():
            dht.kill()
            dht.join(timeout=STALE_WAIT_S)
