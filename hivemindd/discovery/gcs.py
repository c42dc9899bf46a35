"""``gs://bucket/prefix`` discovery through google-cloud-storage (Application Default Credentials).

Peer records live in each object's custom metadata, so one list call returns
every record. Freshness is judged by the store's ``updated`` time against the
store's own clock (estimated from our latest write), never the writer's clock:
volunteer machines' clocks are wrong. Creates use ``if_generation_match=0`` and
stale deletes the generation that was listed, so a peer that just refreshed is
never deleted.

A listing looks at most ``MAX_SCANNED_NAMES`` objects and keeps the freshest
``MAX_LISTED_OBJECTS`` within ``MAX_LISTED_BYTES``; ``get`` downloads at most
``MAX_OBJECT_BYTES`` (a ranged request), so whoever can write the bucket cannot
make a host download without bound.
"""

from __future__ import annotations

import asyncio
import builtins
import heapq
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import urlparse

from hivemindd.discovery.backend import (
    MAX_LISTED_BYTES,
    MAX_LISTED_OBJECTS,
    MAX_OBJECT_BYTES,
    MAX_SCANNED_NAMES,
    DiscoveryError,
    StoredObject,
    TruncationLog,
)
from hivemindd.discovery.records import MAX_RECORD_BYTES

T = TypeVar("T")
RECORD_KEY = "record"
MAX_METADATA_BYTES = 7 * 1024  # GCS allows 8 KiB of custom metadata per object
REQUEST_TIMEOUT_S = 10.0
RETRY_DEADLINE_S = 20.0


class GcsBackend:
    """Objects under ``gs://bucket/prefix/``; the client is made on first use."""

    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "gs" or not parsed.netloc:
            raise DiscoveryError(f"{url}: expected gs://bucket/prefix")
        self.url = url
        self.bucket_name = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self._bucket: Any = None
        # (store's `updated` of our latest write, our monotonic clock then): the store's "now".
        self._store_clock: tuple[float, float] | None = None
        self._truncation = TruncationLog(url)

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _key(self, name: str) -> str:
        return name[len(self.prefix) + 1:] if self.prefix else name

    def _get_bucket(self) -> Any:
        if self._bucket is None:
            from google.cloud import storage

            self._bucket = storage.Client().bucket(self.bucket_name)
        return self._bucket

    def _store_now(self) -> float:
        if self._store_clock is None:
            return time.time()  # before our first write: the best we have
        updated, at = self._store_clock
        return updated + (time.monotonic() - at)

    def _note_write(self, blob: Any) -> None:
        if isinstance(blob.updated, datetime):
            self._store_clock = (blob.updated.timestamp(), time.monotonic())

    async def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(fn)
        except Exception as exc:
            raise _explain(self, what, exc) from None

    async def put(self, key: str, body: bytes) -> None:
        if len(body) > MAX_METADATA_BYTES:
            raise DiscoveryError(f"{self.url}: record for {key} is {len(body)} bytes, over GCS's metadata limit")

        def write() -> None:
            blob = self._get_bucket().blob(self._name(key))
            blob.metadata = {RECORD_KEY: body.decode()}
            blob.upload_from_string(b"", content_type="application/json", timeout=REQUEST_TIMEOUT_S,
                                    retry=_retry())
            self._note_write(blob)

        await self._call(f"write {key}", write)

    async def create(self, key: str, body: bytes) -> bool:
        from google.api_core.exceptions import PreconditionFailed

        def write() -> bool:
            blob = self._get_bucket().blob(self._name(key))
            try:
                # Generation 0 means "only if absent": two hosts creating one run, one wins.
                blob.upload_from_string(body, content_type="application/json", if_generation_match=0,
                                        timeout=REQUEST_TIMEOUT_S, retry=_retry())
            except PreconditionFailed:
                return False
            return True

        return await self._call(f"create {key}", write)

    async def get(self, key: str) -> bytes | None:
        from google.api_core.exceptions import NotFound, RequestRangeNotSatisfiable

        def read() -> bytes | None:
            blob = self._get_bucket().blob(self._name(key))
            try:
                # A range (``end`` is inclusive): one byte over the limit tells us the object is too big.
                data: bytes = blob.download_as_bytes(end=MAX_OBJECT_BYTES, timeout=REQUEST_TIMEOUT_S,
                                                     retry=_retry())
            except RequestRangeNotSatisfiable:
                return b""  # an empty object has no byte 0
            except NotFound:
                if not self._get_bucket().exists(timeout=REQUEST_TIMEOUT_S):
                    raise
                return None
            if len(data) > MAX_OBJECT_BYTES:
                raise DiscoveryError(f"{self.url}: {key} is over the {MAX_OBJECT_BYTES}-byte limit; "
                                     "refusing to read it")
            return data

        return await self._call(f"read {key}", read)

    async def list(self, prefix: str) -> builtins.list[StoredObject]:
        def listing() -> builtins.list[StoredObject]:
            blobs = self._get_bucket().client.list_blobs(
                self.bucket_name, prefix=self._name(prefix), delimiter="/", max_results=MAX_SCANNED_NAMES + 1,
                timeout=REQUEST_TIMEOUT_S, retry=_retry())
            now = self._store_now()
            scanned = 0

            def entries() -> Any:
                nonlocal scanned
                for blob in blobs:
                    scanned += 1
                    if scanned > MAX_SCANNED_NAMES:
                        return
                    record = str((blob.metadata or {}).get(RECORD_KEY, ""))[:MAX_RECORD_BYTES + 1]
                    updated = blob.updated.timestamp() if isinstance(blob.updated, datetime) else 0.0
                    yield updated, blob.name, record.encode()[:MAX_RECORD_BYTES + 1], str(blob.generation)

            # Freshest first, and only so many: a bucket full of junk cannot crowd out live peers.
            chosen = heapq.nlargest(MAX_LISTED_OBJECTS, entries(), key=lambda e: e[0])
            cut = (f"more than {MAX_SCANNED_NAMES} names" if scanned > MAX_SCANNED_NAMES
                   else f"more than {MAX_LISTED_OBJECTS} objects" if scanned > MAX_LISTED_OBJECTS else None)
            out = []
            budget = MAX_LISTED_BYTES
            for updated, name, body, generation in chosen:
                if budget <= 0:
                    cut = f"over {MAX_LISTED_BYTES} bytes"
                    break
                budget -= len(body)
                out.append(StoredObject(self._key(name), body, max(0.0, now - updated), generation))
            self._truncation.note(prefix, cut)
            return out

        return await self._call(f"list {prefix}", listing)

    async def delete(self, key: str, if_version: str | None = None) -> bool:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        def remove() -> bool:
            blob = self._get_bucket().blob(self._name(key))
            try:
                if if_version is not None:
                    # GCS enforces the precondition below; emulators may not, so look first too.
                    blob.reload(timeout=REQUEST_TIMEOUT_S)
                    if str(blob.generation) != if_version:
                        return False
                blob.delete(if_generation_match=int(if_version) if if_version else None, timeout=REQUEST_TIMEOUT_S)
            except (NotFound, PreconditionFailed):
                return False  # gone already, or rewritten since listed: alive
            return True

        return await self._call(f"delete {key}", remove)


def _retry() -> Any:
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_timeout(RETRY_DEADLINE_S)


def _explain(backend: GcsBackend, what: str, exc: Exception) -> DiscoveryError:
    """Turn a client error into one line that says what is wrong and how to fix it."""
    if isinstance(exc, DiscoveryError):
        return exc
    from google.api_core import exceptions as gexc
    from google.auth.exceptions import DefaultCredentialsError

    where = f"gs://{backend.bucket_name}"
    if isinstance(exc, DefaultCredentialsError):
        return DiscoveryError(f"{backend.url}: no Google credentials: run `gcloud auth application-default login` "
                              "or set GOOGLE_APPLICATION_CREDENTIALS")
    if isinstance(exc, gexc.NotFound):
        return DiscoveryError(f"{backend.url}: bucket {where} does not exist (create it, or fix --discovery)")
    if isinstance(exc, gexc.Forbidden | gexc.Unauthorized):
        return DiscoveryError(f"{backend.url}: permission denied on {where}: grant this machine's account "
                              f"roles/storage.objectAdmin on the bucket ({exc.message})")
    if isinstance(exc, gexc.GoogleAPICallError):
        return DiscoveryError(f"{backend.url}: cannot {what}: HTTP {exc.code} {exc.message}")
    return DiscoveryError(f"{backend.url}: cannot {what}: {type(exc).__name__}: {exc}")
