"""The storage interface discovery needs: a flat namespace of small objects.

Two implementations: ``file://`` (file.py, the embedded default) and ``gs://``
(gcs.py). Keys are relative paths like ``runs/demo/peers/<peer_id>.json``.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Protocol

import structlog

from hivemindd.discovery.records import MAX_RECORD_BYTES

log = structlog.get_logger(__name__)

# Whoever can write the store must not be able to make a listing cost without bound.
MAX_OBJECT_BYTES = max(MAX_RECORD_BYTES, 256 * 1024)  # one object read by get() (a spec is larger than a record)
MAX_LISTED_OBJECTS = 1000  # objects one listing returns: the freshest
MAX_SCANNED_NAMES = 4000  # names one listing looks at to find them
MAX_LISTED_BYTES = 4 * 1024 * 1024  # bodies one listing returns, all together


class DiscoveryError(RuntimeError):
    """The store could not be reached or refused us; the message says how to fix it."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    body: bytes
    age_s: float  # judged by the store (file mtime, object ``updated``), not the writer
    version: str  # opaque token for a conditional delete (mtime_ns, GCS generation)
    problem: str | None = None  # why the store itself says to ignore this object (a FIFO, a future mtime)


class DiscoveryBackend(Protocol):
    url: str

    async def put(self, key: str, body: bytes) -> None:
        """Create or replace ``key`` atomically."""

    async def create(self, key: str, body: bytes) -> bool:
        """Create ``key`` only if absent; False when it already exists."""

    async def get(self, key: str) -> bytes | None:
        """The object's bytes, None when absent."""

    async def list(self, prefix: str) -> builtins.list[StoredObject]:
        """The objects directly under ``prefix`` (a folder-like key ending in '/'), freshest first.

        At most ``MAX_LISTED_OBJECTS`` objects and ``MAX_LISTED_BYTES`` of bodies; more are left
        out and logged once (``discovery.listing_truncated``) until a listing fits again.
        """

    async def delete(self, key: str, if_version: str | None = None) -> bool:
        """Delete ``key`` (only at ``if_version`` when given); False when absent or changed."""


class TruncationLog:
    """Logs once that listings of a prefix are cut short, and again only after one fitted."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._cut: set[str] = set()

    def note(self, prefix: str, why: str | None) -> None:
        if why is None:
            self._cut.discard(prefix)
        elif prefix not in self._cut:
            self._cut.add(prefix)
            log.warning("discovery.listing_truncated", url=self.url, prefix=prefix, reason=why)
