"""``file:///path`` discovery: one file per object in a local or shared directory.

Whoever can write the shared directory must not be able to steer this daemon
(which may run as root) at files outside it, nor hang it. So:

- The root is the configured path, resolved once (the first time it exists): a
  symbolic link in that path is the operator's choice. Every operation walks
  from ``/`` to the object's folder one component at a time with
  ``O_DIRECTORY|O_NOFOLLOW`` and then works relative to that folder's
  descriptor (``openat``, ``renameat``, ``linkat``, ``unlinkat``): no path is
  resolved twice, and a symbolic link anywhere below the root is refused.
- Files are opened ``O_NONBLOCK|O_NOFOLLOW`` and read only when the opened
  descriptor is a regular file, and only so many bytes: a FIFO or a device
  cannot hang a reader. A listing reads at most ``MAX_LISTED_OBJECTS`` files
  (the freshest) and ``MAX_LISTED_BYTES``, within ``LIST_DEADLINE_S``.
- Only ``<peer id>.json`` names are ever deleted.
- Freshness is the file's mtime; an mtime more than ``FUTURE_SKEW_S`` ahead of
  our clock marks the file invalid (it would otherwise stay fresh forever).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import heapq
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

from hivemindd.discovery.backend import (
    MAX_LISTED_BYTES,
    MAX_LISTED_OBJECTS,
    MAX_OBJECT_BYTES,
    MAX_SCANNED_NAMES,
    DiscoveryError,
    StoredObject,
    TruncationLog,
)
from hivemindd.discovery.records import MAX_RECORD_BYTES, is_record_name

FUTURE_SKEW_S = 60.0  # clocks of a file server and its clients disagree by this much at most
LIST_DEADLINE_S = 10.0  # a listing stops reading files after this long (a slow or hostile share)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")  # one component of a key: no '..', no dot files
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY


class _Unreadable(Exception):
    """A name in the store that is not a regular file we can read; the message says what it is."""


class FileBackend:
    """Objects are files under ``root``; writes are atomic renames, creates are hard links."""

    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "file" or parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise DiscoveryError(f"{url}: expected file:///absolute/path")
        self.url = url
        self.root = Path(unquote(parsed.path))
        self._real_root: str | None = None  # the root resolved once, the first time it exists
        self._truncation = TruncationLog(url)

    # --- keys and folders ------------------------------------------------------------------

    def _split(self, key: str) -> list[str]:
        parts = key.removesuffix("/").split("/")  # "a/b/" is the folder a/b; "/a" is no key
        if not all(_NAME.fullmatch(p) for p in parts):
            raise DiscoveryError(f"key {key!r} escapes the discovery directory or names a hidden file "
                                 "(keys are plain names joined by '/')")
        return parts

    def _open_root(self) -> int:
        # Never create the root: a missing (unmounted) shared directory must show as degraded,
        # not as an empty swarm of one.
        missing = DiscoveryError(f"{self.url}: discovery directory {self.root} does not exist or is not a directory")
        if self._real_root is None:
            real = os.path.realpath(self.root)
            if not os.path.isdir(real):
                raise missing
            self._real_root = real
        fd = os.open("/", _DIR_FLAGS)
        walked = ""
        try:
            for part in (p for p in self._real_root.split("/") if p):
                walked += f"/{part}"
                try:
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    raise missing from None
                except OSError as exc:  # Linux says ENOTDIR for a link opened O_DIRECTORY|O_NOFOLLOW
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    if not stat.S_ISLNK(os.lstat(part, dir_fd=fd).st_mode):
                        raise missing from None
                    raise DiscoveryError(
                        f"{self.url}: {walked} became a symbolic link after hivemindd resolved the discovery "
                        f"directory to {self._real_root}; restart hivemindd to follow it") from None
                os.close(fd)
                fd = next_fd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_folder(self, parts: list[str], *, create: bool) -> int | None:
        """A descriptor of the folder ``parts`` below the root; None when absent and not ``create``."""
        fd = self._open_root()
        try:
            for depth, part in enumerate(parts):
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, dir_fd=fd)
                try:
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if create:
                        raise  # removed again right after we made it: fails this round
                    os.close(fd)
                    return None
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    folder = "/".join(parts[:depth + 1])
                    raise DiscoveryError(
                        f"{self.url}: {folder} is a symbolic link or not a folder; discovery never follows "
                        "links inside its directory (remove it; to keep the store elsewhere, configure that "
                        "path as the discovery URL)") from None
                os.close(fd)
                fd = next_fd
        except BaseException:
            os.close(fd)
            raise
        return fd

    # --- reading one file ------------------------------------------------------------------

    @staticmethod
    def _read_at(dir_fd: int, name: str, limit: int) -> tuple[bytes, os.stat_result]:
        """Up to ``limit`` bytes of the regular file ``name`` in ``dir_fd``, and its fstat."""
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _Unreadable("is a symbolic link") from None
            raise _Unreadable(f"cannot be opened: {exc.strerror or exc}") from None
        try:
            st = os.fstat(fd)  # the file we opened, whatever the name pointed at when listed
            if not stat.S_ISREG(st.st_mode):
                raise _Unreadable("is not a regular file (a FIFO, socket or device)")
            chunks: list[bytes] = []
            size = 0
            while size < limit:
                chunk = os.read(fd, min(limit - size, 1 << 16))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks), st
        finally:
            os.close(fd)

    # --- the protocol --------------------------------------------------------------------------

    async def put(self, key: str, body: bytes) -> None:
        await asyncio.to_thread(self._put, key, body)

    def _put(self, key: str, body: bytes) -> None:
        *folder, name = self._split(key)
        try:
            dir_fd = self._open_folder(folder, create=True)
            assert dir_fd is not None
            try:
                tmp = self._write_temp(dir_fd, name, body)
                try:
                    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                except BaseException:
                    os.unlink(tmp, dir_fd=dir_fd)
                    raise
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise DiscoveryError(f"{self.url}: cannot write {key}: {exc.strerror or exc}") from None

    @staticmethod
    def _write_temp(dir_fd: int, name: str, body: bytes) -> str:
        """A new, fsynced, 0644 temporary file next to ``name``; returns its name."""
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd)
        try:
            os.fchmod(fd, 0o644)
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.close(fd)
        return tmp

    async def create(self, key: str, body: bytes) -> bool:
        return await asyncio.to_thread(self._create, key, body)

    def _create(self, key: str, body: bytes) -> bool:
        *folder, name = self._split(key)
        try:
            dir_fd = self._open_folder(folder, create=True)
            assert dir_fd is not None
            try:
                tmp = self._write_temp(dir_fd, name, body)
                try:
                    # link() fails if the name exists: a whole file appears, or nothing does.
                    os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
                    return True
                except FileExistsError:
                    return False
                finally:
                    os.unlink(tmp, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise DiscoveryError(f"{self.url}: cannot create {key}: {exc.strerror or exc}") from None

    async def get(self, key: str) -> bytes | None:
        return await asyncio.to_thread(self._get, key)

    def _get(self, key: str) -> bytes | None:
        *folder, name = self._split(key)
        try:
            dir_fd = self._open_folder(folder, create=False)
            if dir_fd is None:
                return None
            try:
                body, _ = self._read_at(dir_fd, name, MAX_OBJECT_BYTES + 1)
            finally:
                os.close(dir_fd)
        except FileNotFoundError:
            return None
        except _Unreadable as exc:
            raise DiscoveryError(f"{self.url}: {key} {exc}; refusing to read it") from None
        except OSError as exc:
            raise DiscoveryError(f"{self.url}: cannot read {key}: {exc.strerror or exc}") from None
        if len(body) > MAX_OBJECT_BYTES:
            raise DiscoveryError(f"{self.url}: {key} is over the {MAX_OBJECT_BYTES}-byte limit; refusing to read it")
        return body

    async def list(self, prefix: str) -> builtins.list[StoredObject]:
        return await asyncio.to_thread(self._list, prefix)

    def _list(self, prefix: str) -> builtins.list[StoredObject]:
        try:
            dir_fd = self._open_folder(self._split(prefix), create=False)
            if dir_fd is None:
                return []
            try:
                return self._read_folder(dir_fd, prefix.removesuffix("/"))
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise DiscoveryError(f"{self.url}: cannot list {prefix}: {exc.strerror or exc}") from None

    def _read_folder(self, dir_fd: int, folder: str) -> builtins.list[StoredObject]:
        now = time.time()
        counts = {"scanned": 0, "objects": 0}

        def candidates() -> Iterator[tuple[float, str]]:
            with os.scandir(dir_fd) as entries:
                for entry in entries:
                    counts["scanned"] += 1
                    if counts["scanned"] > MAX_SCANNED_NAMES:
                        return
                    if not _NAME.fullmatch(entry.name):
                        continue  # our temporary files, and names no key can have
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue  # deleted meanwhile
                    if stat.S_ISDIR(st.st_mode):
                        continue
                    counts["objects"] += 1
                    # Freshest first; a future mtime is invalid, so it goes last, not first.
                    yield (st.st_mtime if st.st_mtime <= now + FUTURE_SKEW_S else float("-inf")), entry.name

        chosen = heapq.nlargest(MAX_LISTED_OBJECTS, candidates())
        cut = (f"more than {MAX_SCANNED_NAMES} names" if counts["scanned"] > MAX_SCANNED_NAMES
               else f"more than {MAX_LISTED_OBJECTS} objects" if counts["objects"] > MAX_LISTED_OBJECTS else None)
        out: list[StoredObject] = []
        budget = MAX_LISTED_BYTES
        deadline = time.monotonic() + LIST_DEADLINE_S
        for _, name in chosen:
            if budget <= 0 or time.monotonic() > deadline:
                cut = f"over {MAX_LISTED_BYTES} bytes" if budget <= 0 else f"over {LIST_DEADLINE_S:.0f} s"
                break
            key = f"{folder}/{name}"
            try:
                body, st = self._read_at(dir_fd, name, MAX_RECORD_BYTES + 1)
            except FileNotFoundError:
                continue  # deleted between the listing and the open
            except _Unreadable as exc:
                try:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except OSError:
                    continue
                out.append(StoredObject(key, b"", max(0.0, now - st.st_mtime), str(st.st_mtime_ns), problem=str(exc)))
                continue
            budget -= len(body)
            if st.st_mtime > now + FUTURE_SKEW_S:
                out.append(StoredObject(key, b"", 0.0, str(st.st_mtime_ns),
                                        problem=f"modified {st.st_mtime - now:.0f} s in the future"))
                continue
            out.append(StoredObject(key, body, max(0.0, now - st.st_mtime), str(st.st_mtime_ns)))
        self._truncation.note(folder, cut)
        return out

    async def delete(self, key: str, if_version: str | None = None) -> bool:
        return await asyncio.to_thread(self._delete, key, if_version)

    def _delete(self, key: str, if_version: str | None) -> bool:
        *folder, name = self._split(key)
        if not is_record_name(name):
            raise DiscoveryError(f"{self.url}: refusing to delete {key}: only peer records (<peer id>.json) "
                                 "are ever deleted")
        try:
            dir_fd = self._open_folder(folder, create=False)
            if dir_fd is None:
                return False
            try:
                if if_version is not None:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    if not stat.S_ISREG(st.st_mode) or str(st.st_mtime_ns) != if_version:
                        return False  # refreshed since it was listed: it is alive
                os.unlink(name, dir_fd=dir_fd)  # the name in this folder, never what it may point at
                return True
            finally:
                os.close(dir_fd)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise DiscoveryError(f"{self.url}: cannot delete {key}: {exc.strerror or exc}") from None
