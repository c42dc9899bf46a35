"""Opening a data location: a local path, ``file://``, ``gs://`` or ``http(s)://``.

A leaf module: shards (``data.py``) and folder trees (``folder_tree.py``) both read
through it. ``gs://`` objects are read with google-cloud-storage (chunked ranged reads
with the library's retry, the generation pinned per object), ``http(s)://`` with
urllib (a few attempts on 5xx and 429), local files through the host's read policy
(``read_policy.py``), which also says which URL hosts may be asked.
"""

from __future__ import annotations

import os
import time
import urllib.error
from typing import IO, Any
from urllib.parse import urlparse

from hivemindd.trainer import read_policy
from hivemindd.trainer.read_policy import ReadPolicy

REMOTE_SCHEMES = ("gs://", "https://", "http://")
GCS_CHUNK_BYTES = 16 << 20  # one ranged GET per chunk, each retried by the library on its own
HTTP_TIMEOUT_S = 60.0
HTTP_ATTEMPTS = 3

_gcs_clients: dict[tuple[int, str | None], Any] = {}


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_SCHEMES)


def gcs_client() -> Any:
    """This process's storage client, made on first use.

    A client holds sockets and credential refresh state that must not cross a fork:
    every loader worker makes its own (hence the pid in the cache key). With
    STORAGE_EMULATOR_HOST set the library talks to the emulator with anonymous
    credentials by itself; otherwise it uses Application Default Credentials.
    """
    key = (os.getpid(), os.environ.get("STORAGE_EMULATOR_HOST"))
    if key not in _gcs_clients:
        from google.cloud import storage  # imported late: only gs:// data needs it

        for (pid, _), stale in list(_gcs_clients.items()):
            if pid == os.getpid():
                stale.close()  # the emulator moved (tests)
        _gcs_clients.clear()  # a forked child's copy of its parent's client is never used
        _gcs_clients[key] = storage.Client()
    return _gcs_clients[key]


def split_gs(url: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` → ``("bucket", "a/b")``."""
    parsed = urlparse(url)
    return parsed.netloc, parsed.path.lstrip("/")


def open_location(url: str, policy: ReadPolicy | None = None) -> IO[bytes]:
    """A readable binary stream for a local path, file://, gs:// or https:// location.

    ``policy`` (default: this process's) says which local files and URL hosts may be read;
    ReadRefused when this is not one of them, or not a regular file.
    """
    if url.startswith("gs://"):
        return _open_gcs(url)
    if url.startswith(("https://", "http://")):
        return _open_http(url, policy)
    if url.startswith("file://"):
        url = urlparse(url).path
    return read_policy.open_local(url, policy)  # the caller closes it


def is_missing(exc: BaseException) -> bool:
    """True when ``exc`` (raised by ``open_location`` or a read) says the object does not exist."""
    if isinstance(exc, FileNotFoundError):
        return True
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code == 404
    return type(exc).__name__ == "NotFound"  # google.api_core.exceptions.NotFound, not imported for local data


def _open_gcs(url: str) -> IO[bytes]:
    bucket_name, name = split_gs(url)
    bucket = gcs_client().bucket(bucket_name)
    meta = bucket.get_blob(name)  # one metadata GET: it fixes the generation this shard is read at
    if meta is None:
        from google.api_core.exceptions import NotFound

        raise NotFound(f"404 {url} does not exist")
    # A blob bound to a generation reads that generation only: an object replaced while we
    # read it fails the shard (404) rather than mixing two versions.
    pinned = bucket.blob(name, generation=meta.generation)
    stream: IO[bytes] = pinned.open("rb", chunk_size=GCS_CHUNK_BYTES)
    return stream


def _open_http(url: str, policy: ReadPolicy | None = None) -> IO[bytes]:
    opener = read_policy.url_opener(policy)  # refuses loopback/link-local hosts, redirects included
    for attempt in range(1, HTTP_ATTEMPTS + 1):
        try:
            response: IO[bytes] = opener.open(url, timeout=HTTP_TIMEOUT_S)
            return response
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the response and its socket; the status is all we need
            if exc.code < 500 and exc.code != 429:
                raise  # 404 and friends will not get better with another try
            if attempt == HTTP_ATTEMPTS:
                raise
        except OSError:
            if attempt == HTTP_ATTEMPTS:
                raise
        time.sleep(2 ** (attempt - 1))  # backoff between attempts: 1 s, 2 s
    raise AssertionError("unreachable")
