"""Images read straight from a folder tree: ``<root>/<class>/<file>.JPEG`` (ImageNet's train layout).

``[data] train = "gs://bucket/ILSVRC2012_img_train/"`` (or a local ``/data/train/``):
a trailing slash means a folder tree rather than shards. The tree is listed once,
one listing per class folder in parallel threads, and the index is cached under
the trainer's cache dir (``folder-index/<sha of the URL>.json.gz``), so a restart
or a second run starts at once; delete that file to list the tree anew. A class's
index is the position of its folder name in the sorted list of folder names (0..999
for ImageNet), or its position in ``[data] classes`` when a class list is given.

Every loader worker draws files at random, with its own seed, forever (as shards are
drawn), and reads them in a pool of threads: small objects are latency-bound, so
many reads must be in flight at once. Reads of ``gs://`` objects use the library's
own retry; a file that still fails is skipped with a warning and counted in the
ShardTally, and only a long run of failures stops the trainer.
"""

from __future__ import annotations

import collections
import concurrent.futures
import gzip
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hivemindd.trainer import read_policy
from hivemindd.trainer.errors import ConfigError, NoReadableShards
from hivemindd.trainer.read_policy import ReadPolicy, ReadRefused
from hivemindd.trainer.storage import gcs_client, split_gs

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".webp")
INDEX_FORMAT = 1
LIST_THREADS = 16  # class folders listed at once
READ_THREADS = 16  # image reads in flight per loader worker
MAX_CONSECUTIVE_FAILURES = 64
MAX_IMAGE_BYTES = 64 << 20  # a file read whole into memory; larger ones are skipped (as data.MAX_TAR_ENTRY_BYTES)
PROGRESS_EVERY = 100  # class folders between listing progress lines


def is_folder_tree(url: str) -> bool:
    """A data location ending in ``/`` names a tree of class folders, not shards."""
    return url.endswith("/")


@dataclass(frozen=True)
class TreeIndex:
    """Every image of a tree: class names (index = position) and (class index, path under the root)."""

    url: str
    classes: list[str]
    files: list[tuple[int, str]]


def index_path(url: str, cache_dir: str) -> Path:
    digest = hashlib.sha256(url.encode()).hexdigest()[:24]
    return Path(cache_dir) / "folder-index" / f"{digest}.json.gz"


def load_or_build_index(url: str, cache_dir: str, key: str, classes: Sequence[str] | None = None) -> Path:
    """The cached index of the tree at ``url`` (listing it first if needed); ConfigError if unusable."""
    path = index_path(url, cache_dir)
    if path.exists():
        try:
            index = read_index(path)
            if index.url == url:
                log.info("%s: %d images in %d classes (index cached at %s)", key, len(index.files),
                         len(index.classes), path)
                _check_classes(index, classes, key)
                return path
        except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:
            log.warning("%s: cached index %s is unreadable (%s); listing the tree again", key, path, exc)
    started = time.monotonic()
    index = list_tree(url, key)
    _check_classes(index, classes, key)
    _write_index(path, index)
    log.info("%s: listed %d images in %d classes in %.1fs; index cached at %s", key, len(index.files),
             len(index.classes), time.monotonic() - started, path)
    return path


def _check_classes(index: TreeIndex, classes: Sequence[str] | None, key: str) -> None:
    if classes is None:
        return
    unknown = sorted(set(index.classes) - set(classes))
    if unknown:
        raise ConfigError(f"{key}: folders {', '.join(unknown[:3])} of {index.url} are not in the class list "
                          f"(data.classes); {len(unknown)} unknown in all")


def list_tree(url: str, key: str) -> TreeIndex:
    """List ``<url><class>/<image>`` files; ConfigError when the tree is missing or holds no images."""
    lister = _GcsLister(url) if url.startswith("gs://") else _LocalLister(url)
    if isinstance(lister, _LocalLister):
        try:
            read_policy.current().check_local(lister.root)
        except ReadRefused as exc:
            raise ConfigError(f"{key}: {exc}") from None
    try:
        folders = sorted(lister.folders())
    except Exception as exc:
        raise ConfigError(f"{key}: cannot list {url} ({_first_line(exc)})") from None
    if not folders:
        raise ConfigError(f"{key}: {url} has no class folders (expected {url}<class>/<image>.JPEG)")
    files: list[tuple[int, str]] = []
    with concurrent.futures.ThreadPoolExecutor(LIST_THREADS) as pool:
        listings = pool.map(lister.images, folders)
        try:
            for number, (folder, names) in enumerate(zip(folders, listings, strict=True), start=1):
                files.extend((number - 1, f"{folder}/{name}") for name in names)
                if number % PROGRESS_EVERY == 0 or number == len(folders):
                    log.info("%s: listed %d of %d class folders (%d images)", key, number, len(folders), len(files))
        except Exception as exc:
            raise ConfigError(f"{key}: cannot list {url} ({_first_line(exc)})") from None
    if not files:
        raise ConfigError(f"{key}: the class folders of {url} hold no images ({'/'.join(IMAGE_SUFFIXES)})")
    return TreeIndex(url, folders, files)


def read_index(path: Path) -> TreeIndex:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        raw = json.load(f)
    if raw.get("format") != INDEX_FORMAT:
        raise ValueError(f"index format {raw.get('format')!r}, expected {INDEX_FORMAT}")
    classes = [str(c) for c in raw["classes"]]
    files = [(int(i), str(name)) for i, name in raw["files"]]
    return TreeIndex(str(raw["url"]), classes, files)


def _write_index(path: Path, index: TreeIndex) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        json.dump({"format": INDEX_FORMAT, "url": index.url, "classes": index.classes,
                   "files": index.files}, f, separators=(",", ":"))
    os.replace(tmp, path)  # never a half-written index under the real name


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


class _LocalLister:
    def __init__(self, url: str) -> None:
        self.root = Path(urlparse(url).path if url.startswith("file://") else url).expanduser()

    def folders(self) -> list[str]:
        if not self.root.is_dir():
            raise NotADirectoryError(f"{self.root} is not a folder")
        return [entry.name for entry in os.scandir(self.root) if entry.is_dir() and not entry.name.startswith(".")]

    def images(self, folder: str) -> list[str]:
        return sorted(e.name for e in os.scandir(self.root / folder) if e.is_file() and _is_image(e.name))


class _GcsLister:
    def __init__(self, url: str) -> None:
        self.bucket, self.prefix = split_gs(url)

    def folders(self) -> list[str]:
        blobs = gcs_client().list_blobs(self.bucket, prefix=self.prefix, delimiter="/")
        for _ in blobs.pages:  # prefixes fill in as pages are read
            pass
        return [p[len(self.prefix):].rstrip("/") for p in blobs.prefixes]

    def images(self, folder: str) -> list[str]:
        start = f"{self.prefix}{folder}/"
        blobs = gcs_client().list_blobs(self.bucket, prefix=start, fields="items(name),nextPageToken")
        names = (blob.name[len(start):] for blob in blobs)
        return sorted(n for n in names if "/" not in n and _is_image(n))


class TreeReader:
    """Endless raw samples (``{"__key__", "jpeg"|"png"|…, "cls"}``) drawn at random from a cached tree index.

    Picklable and light: the index is loaded inside each loader worker, where the reads happen.
    """

    def __init__(self, url: str, index_file: str, key: str = "data.train", classes: Sequence[str] | None = None,
                 tally: Any = None) -> None:
        self.url, self.index_file, self.key, self.tally = url, index_file, key, tally
        self.classes = list(classes) if classes is not None else None
        self.policy = read_policy.current()  # travels to loader workers with the reader

    def __call__(self) -> Iterator[dict[str, Any]]:  # a webdataset source stage
        index = read_index(Path(self.index_file))
        remap = self._remap(index)
        read = _reader(self.url, self.policy)
        rng = random.Random()  # seeded from the OS: every worker and every restart draws its own sequence
        in_flight: collections.deque[tuple[int, str, concurrent.futures.Future[bytes]]] = collections.deque()
        failures = 0
        with concurrent.futures.ThreadPoolExecutor(READ_THREADS, thread_name_prefix="tree-read") as pool:
            try:
                while True:
                    while len(in_flight) < 2 * READ_THREADS:
                        cls, name = index.files[rng.randrange(len(index.files))]
                        in_flight.append((cls, name, pool.submit(read, name)))
                    cls, name, future = in_flight.popleft()
                    try:
                        data = future.result()
                    except Exception as exc:
                        failures += 1
                        self._failed(name, exc, failures)
                        continue
                    failures = 0
                    stem, _, suffix = name.rpartition(".")
                    yield {"__key__": stem, "__url__": self.url, suffix.lower(): data,
                           "cls": str(remap[cls]).encode()}
            finally:
                for _, _, future in in_flight:
                    future.cancel()

    def _remap(self, index: TreeIndex) -> list[int]:
        if self.classes is None:
            return list(range(len(index.classes)))
        position = {name: i for i, name in enumerate(self.classes)}
        return [position[name] for name in index.classes]  # checked when the index was made

    def _failed(self, name: str, exc: BaseException, failures: int) -> None:
        log.warning("%s: skipping %s%s: %s", self.key, self.url, name, _first_line(exc))
        if self.tally is not None:
            self.tally.add_failure()
        if failures >= MAX_CONSECUTIVE_FAILURES:
            raise NoReadableShards(f"{self.key}: no image of {self.url} could be read: {failures} failed in a row, "
                                   f"the last with: {_first_line(exc)}")


def _reader(url: str, policy: ReadPolicy) -> Callable[[str], bytes]:
    if url.startswith("gs://"):
        bucket_name, prefix = split_gs(url)

        def read_gcs(name: str) -> bytes:
            data: bytes = gcs_client().bucket(bucket_name).blob(prefix + name).download_as_bytes()  # library retry
            return data

        _widen_connection_pool()
        return read_gcs
    root = _LocalLister(url).root
    # Each file is checked on its own: a symlink in the tree must not lead out of what the policy allows.
    return lambda name: read_policy.read_local(root / name, MAX_IMAGE_BYTES, policy)


def _widen_connection_pool() -> None:
    """Let all READ_THREADS keep a connection: requests pools 10 per host by default and drops the rest."""
    from requests.adapters import HTTPAdapter

    session = gcs_client()._http  # the client's requests session (AuthorizedSession for real credentials)
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=2 * READ_THREADS)
    session.mount("https://", adapter)
    session.mount("http://", adapter)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
