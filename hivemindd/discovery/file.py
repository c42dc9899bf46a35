"""``file:///path`` discovery: one file per object in a local or shared directory."""

from __future__ import annotations

import asyncio
import builtins
import os
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

from hivemindd.discovery.backend import DiscoveryError, StoredObject
from hivemindd.discovery.records import MAX_RECORD_BYTES
from hivemindd.state import write_atomic

_MAX_OBJECT_BYTES = max(MAX_RECORD_BYTES, 256 * 1024)  # specs are larger than peer records


class FileBackend:
    """Objects are files under ``root``; writes are atomic renames, creates are hard links."""

    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
            raise DiscoveryError(f"{url}: expected file:///absolute/path")
        self.url = url
        self.root = Path(unquote(parsed.path))

    def _path(self, key: str) -> Path:
        # Never create the root: a missing (unmounted) shared directory must show as degraded,
        # not as an empty swarm of one.
        if not self.root.is_dir():
            raise DiscoveryError(f"{self.url}: discovery directory {self.root} does not exist or is not a directory")
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise DiscoveryError(f"key {key!r} escapes the discovery directory")
        return path

    async def put(self, key: str, body: bytes) -> None:
        await asyncio.to_thread(self._put, key, body)

    def _put(self, key: str, body: bytes) -> None:
        try:
            write_atomic(self._path(key), body)
        except OSError as exc:
            raise DiscoveryError(f"{self.url}: cannot write {key}: {exc.strerror or exc}") from None

    async def create(self, key: str, body: bytes) -> bool:
        return await asyncio.to_thread(self._create, key, body)

    def _create(self, key: str, body: bytes) -> bool:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(body)
                    f.flush()
                    os.fsync(f.fileno())
                # link() fails if the name exists: a whole file appears, or nothing does.
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        except OSError as exc:
            raise DiscoveryError(f"{self.url}: cannot create {key}: {exc.strerror or exc}") from None

    async def get(self, key: str) -> bytes | None:
        return await asyncio.to_thread(self._get, key)

    def _get(self, key: str) -> bytes | None:
        try:
            with open(self._path(key), "rb") as f:
                return f.read(_MAX_OBJECT_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise DiscoveryError(f"{self.url}: cannot read {key}: {exc.strerror or exc}") from None

    async def list(self, prefix: str) -> builtins.list[StoredObject]:
        return await asyncio.to_thread(self._list, prefix)

    def _list(self, prefix: str) -> builtins.list[StoredObject]:
        folder = self._path(prefix)
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise DiscoveryError(f"{self.url}: cannot list {prefix}: {exc.strerror or exc}") from None
        now = time.time()
        out = []
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                continue
            try:
                stat = entry.stat(follow_symlinks=False)
                with open(entry.path, "rb") as f:
                    body = f.read(_MAX_OBJECT_BYTES + 1)
            except OSError:
                continue  # deleted between scandir and open
            key = f"{prefix.rstrip('/')}/{entry.name}"
            out.append(StoredObject(key, body, max(0.0, now - stat.st_mtime), str(stat.st_mtime_ns)))
        return out

    async def delete(self, key: str, if_version: str | None = None) -> bool:
        return await asyncio.to_thread(self._delete, key, if_version)

    def _delete(self, key: str, if_version: str | None) -> bool:
        path = self._path(key)
        try:
            if if_version is not None and str(path.stat().st_mtime_ns) != if_version:
                return False  # refreshed since it was listed: it is alive
            path.unlink()
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise DiscoveryError(f"{self.url}: cannot delete {key}: {exc.strerror or exc}") from None
