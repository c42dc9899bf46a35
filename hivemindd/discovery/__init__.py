"""Finding the other peers of a run through shared storage (a directory or a GCS bucket).

``agent.py`` is the heartbeat loop, ``records.py`` the wire record, ``backend.py`` the
protocol every store implements, ``file.py`` and ``gcs.py`` the stores. A new store is
one module and one line in ``open_backend``. Imports: the standard library, structlog and
the stores' own clients; nothing else of hivemindd.
"""

from hivemindd.discovery.backend import DiscoveryBackend, DiscoveryError, StoredObject
from hivemindd.discovery.records import PeerRecord, RecordError

__all__ = ["DiscoveryBackend", "DiscoveryError", "PeerRecord", "RecordError", "StoredObject", "open_backend"]


def open_backend(url: str) -> DiscoveryBackend:
    """The backend for a discovery URL; a DiscoveryError names a scheme we do not know."""
    if url.startswith("file://"):
        from hivemindd.discovery.file import FileBackend

        return FileBackend(url)
    if url.startswith("gs://"):
        from hivemindd.discovery.gcs import GcsBackend

        return GcsBackend(url)
    raise DiscoveryError(f"{url}: unknown discovery URL (expected file:///path or gs://bucket/prefix)")
