"""The storage interface discovery needs: a flat namespace of small objects.

Two implementations: ``file://`` (file.py, the embedded default) and ``gs://``
(gcs.py). Keys are relative paths like ``runs/demo/peers/<peer_id>.json``.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Protocol


class DiscoveryError(RuntimeError):
    """The store could not be reached or refused us; the message says how to fix it."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    body: bytes
    age_s: float  # judged by the store (file mtime, object ``updated``), not the writer
    version: str  # opaque token for a conditional delete (mtime_ns, GCS generation)


class DiscoveryBackend(Protocol):
    url: str

    async def put(self, key: str, body: bytes) -> None:
        """Create or replace ``key`` atomically."""

    async def create(self, key: str, body: bytes) -> bool:
        """Create ``key`` only if absent; False when it already exists."""

    async def get(self, key: str) -> bytes | None:
        """The object's bytes, None when absent."""

    async def list(self, prefix: str) -> builtins.list[StoredObject]:
        """Every object directly under ``prefix`` (a folder-like key ending in '/')."""

    async def delete(self, key: str, if_version: str | None = None) -> bool:
        """Delete ``key`` (only at ``if_version`` when given); False when absent or changed."""


def open_backend(url: str) -> DiscoveryBackend:
    """The backend for a discovery URL; a DiscoveryError names a scheme we do not know."""
    if url.startswith("file://"):
        from hivemindd.discovery.file import FileBackend

        return FileBackend(url)
    if url.startswith("gs://"):
        from hivemindd.discovery.gcs import GcsBackend

        return GcsBackend(url)
    raise DiscoveryError(f"{url}: unknown discovery URL (expected file:///path or gs://bucket/prefix)")
