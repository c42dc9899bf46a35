"""Finding the other peers of a run through shared storage (a directory or a GCS bucket)."""

from hivemindd.discovery.backend import DiscoveryBackend, DiscoveryError, StoredObject, open_backend
from hivemindd.discovery.records import PeerRecord, RecordError

__all__ = ["DiscoveryBackend", "DiscoveryError", "PeerRecord", "RecordError", "StoredObject", "open_backend"]
