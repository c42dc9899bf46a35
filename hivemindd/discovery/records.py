"""The discovery record each peer publishes about itself: typed, versioned, tolerant.

Readers ignore unknown fields and default missing optional ones, and reject
anything that could mislead a bootstrap (wrong types, huge values, multiaddrs
that are not this peer's) with a ``RecordError`` that says why.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

RECORD_VERSION = 1
MAX_RECORD_BYTES = 16 * 1024
MAX_MADDRS = 32
_PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{32,128}")  # base58btc
_MADDR = re.compile(r"(/[A-Za-z0-9_.:\[\]-]+)+")
_RECORD_NAME = re.compile(rf"{_PEER_ID.pattern}\.json")


def is_record_name(name: str) -> bool:
    """Whether a file or object name is ``<peer id>.json``: the only names discovery ever deletes."""
    return _RECORD_NAME.fullmatch(name) is not None


class RecordError(ValueError):
    """A discovery record that must be ignored; the message says why."""


@dataclass(frozen=True)
class PeerRecord:
    """One host's announcement: how to reach its DHT node, and what it is doing."""

    peer_id: str
    maddrs: tuple[str, ...]
    hostname: str = ""
    version: str = ""
    state: str = ""
    run_id: str | None = None
    heartbeat: float = 0.0  # the writer's clock: for display only, freshness comes from the store

    def to_json(self) -> bytes:
        body = {
            "record_version": RECORD_VERSION,
            "peer_id": self.peer_id,
            "maddrs": list(self.maddrs),
            "hostname": self.hostname,
            "version": self.version,
            "state": self.state,
            "run_id": self.run_id,
            "heartbeat": self.heartbeat,
        }
        return json.dumps(body, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> PeerRecord:
        if len(data) > MAX_RECORD_BYTES:
            raise RecordError(f"{len(data)} bytes, over the {MAX_RECORD_BYTES}-byte limit")
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise RecordError("not JSON") from None
        if not isinstance(raw, dict):
            raise RecordError("not a JSON object")
        if raw.get("record_version", RECORD_VERSION) != RECORD_VERSION:
            raise RecordError(f"record_version {raw.get('record_version')!r} is not {RECORD_VERSION}")
        peer_id = raw.get("peer_id")
        if not isinstance(peer_id, str) or not _PEER_ID.fullmatch(peer_id):
            raise RecordError(f"peer_id {peer_id!r} is not a base58 peer id")
        maddrs = raw.get("maddrs")
        if not isinstance(maddrs, list) or not maddrs or len(maddrs) > MAX_MADDRS:
            raise RecordError(f"maddrs must be a list of 1..{MAX_MADDRS} multiaddrs")
        for maddr in maddrs:
            if not isinstance(maddr, str) or len(maddr) > 256 or not _MADDR.fullmatch(maddr):
                raise RecordError(f"maddr {maddr!r} is not a multiaddr")
            if not maddr.endswith(f"/p2p/{peer_id}"):
                raise RecordError(f"maddr {maddr!r} does not end with this record's /p2p/{peer_id}")
        return cls(
            peer_id=peer_id,
            maddrs=tuple(maddrs),
            hostname=_text(raw, "hostname"),
            version=_text(raw, "version"),
            state=_text(raw, "state"),
            run_id=_text(raw, "run_id", None),
            heartbeat=float(raw["heartbeat"]) if isinstance(raw.get("heartbeat"), (int, float)) else 0.0,
        )


def _text(raw: dict[str, Any], key: str, default: Any = "") -> Any:
    """A short printable string: whatever a record says reaches terminals and logs, so no control or bidi
    characters (ESC, CR/LF, U+202E …) that could recolour a terminal or forge a line."""
    value = raw.get(key, default)
    if value is default:
        return value
    if not isinstance(value, str) or len(value) > 255:
        raise RecordError(f"{key} must be a string of at most 255 characters")
    if not value.isprintable():
        raise RecordError(f"{key} {value[:40]!r} holds control characters")
    return value
