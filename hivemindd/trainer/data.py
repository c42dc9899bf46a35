"""Training data: shard locations, brace expansion, shard checks and the WebDataset pipeline.

Every peer draws shards at random, with its own seed, forever (``ResampledShards``):
peers need no coordination over who reads what, and a restarted peer simply draws
anew. One dataset epoch is therefore a number of samples (``data.train_samples``),
not a pass over the files.

Shards are local files, ``gs://`` objects or ``https://`` URLs, opened by
``storage.py`` (folder trees are read through it too). A shard that cannot be read
(missing, corrupt, network down, a label that cannot be mapped) costs a warning and
is counted in ``ShardTally``; only when nothing can be read at all does the trainer
stop, with a ConfigError.

What a spec may make the host read (local folders, URL hosts, regular files only) is
the host's read policy (``read_policy.py``); sizes are bounded here: a tar entry over
MAX_TAR_ENTRY_BYTES (a label over MAX_LABEL_BYTES) fails its shard before it is read,
and a class list over MAX_CLASS_LIST_BYTES is refused.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import multiprocessing
import re
import tarfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import DataLoader
from webdataset.tariterators import group_by_keys

from hivemindd.trainer import read_policy
from hivemindd.trainer.demo_data import ensure_demo_shards
from hivemindd.trainer.errors import ConfigError, NoReadableShards
from hivemindd.trainer.folder_tree import TreeReader, index_path, is_folder_tree, load_or_build_index
from hivemindd.trainer.read_policy import ReadRefused
from hivemindd.trainer.storage import is_missing, is_remote, open_location
from hivemindd.trainer.transforms import Prefetcher, train_transform, val_transform

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SHUFFLE_BUFFER = 1000  # samples; mixes consecutive shards without costing much memory
CHECK_ATTEMPTS = 4  # shards tried up front before a location is declared unreadable
MAX_CONSECUTIVE_FAILURES = 32  # per loader worker: past this, the location is taken for unreadable
MISSING_RETRY_S = 600.0  # a shard that was not found is drawn again after this long
PREFETCH_BATCHES = 3  # batches decoded ahead by the prefetch thread when there are no loader workers
# An entry is read whole into memory: a 10 KB shard may declare a 20 GB (sparse) entry. ImageNet's
# largest JPEG is ~15 MB; labels are a few bytes.
MAX_TAR_ENTRY_BYTES = 64 << 20
MAX_LABEL_BYTES = 1024
MAX_CLASS_LIST_BYTES = 16 << 20  # 100,000 names of ~100 bytes
_META_ENTRY = re.compile(r"__[^/]*__($|/)")  # webdataset's own metadata entries, skipped as it does

Batch = tuple[torch.Tensor, torch.Tensor]


class ShardError(Exception):
    """One shard cannot be used (bad label); the shard is skipped and counted."""


class ShardTally:
    """Shards that failed since the trainer started, summed over all loader worker processes."""

    def __init__(self) -> None:
        # Shared memory inherited by (or handed to, under spawn) the loader workers at their start.
        self._failed = multiprocessing.Value("q", 0)

    @property
    def failed(self) -> int:
        return int(self._failed.value)

    def add_failure(self) -> None:
        with self._failed.get_lock():
            self._failed.value += 1


def expand_braces(pattern: str) -> list[str]:
    """``a-{00..02}.tar`` → ``[a-00.tar, a-01.tar, a-02.tar]`` (zero padding kept)."""
    return list(braceexpand.braceexpand(pattern))


def resolve_shards(url: str, key: str, cache_dir: str, classes: Sequence[str] | None = None) -> list[str]:
    """Shard paths or URLs for a spec data location; ConfigError naming ``key`` if there are none.

    Local shards that do not exist are dropped here; remote ones are all returned
    (listing a bucket of 641 shards costs more than finding a missing one when read).
    A folder tree (a location ending in ``/``) is listed once into a cached index
    (see folder_tree.py) and stands for itself: ``[url]``.
    """
    if is_folder_tree(url):
        load_or_build_index(url, cache_dir, key, classes)
        return [url]
    if is_remote(url):
        return expand_braces(url)
    pattern = _local_pattern(url, key, cache_dir)
    paths = expand_braces(pattern)
    policy = read_policy.current()
    for path in paths:
        try:
            policy.check_local(path)
        except ReadRefused as exc:
            raise ConfigError(f"{key}: {exc}") from None
    present = [p for p in paths if Path(p).is_file()]
    if not present:
        raise ConfigError(f"{key}: no shards match {pattern}")
    if len(present) < len(paths):
        found = set(present)
        missing = [p for p in paths if p not in found]
        log.warning("%s: %d of %d shards are missing (first: %s); training on the rest",
                    key, len(missing), len(paths), missing[0])
    return present


def _local_pattern(url: str, key: str, cache_dir: str) -> str:
    if url.startswith("demo://"):
        return _demo_pattern(url, key, cache_dir)
    if url.startswith("file://"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"{key}: {url} names host {parsed.netloc!r}; file:// URLs must be local (file:///path)")
        return parsed.path
    return str(Path(url).expanduser())


def _demo_pattern(url: str, key: str, cache_dir: str) -> str:
    if url not in ("demo://shapes/train", "demo://shapes/val"):
        raise ConfigError(f"{key}: {url!r} is not a demo set (use demo://shapes/train or demo://shapes/val)")
    shards = ensure_demo_shards(cache_dir)
    return shards.train if url.endswith("/train") else shards.val


# --- labels -----------------------------------------------------------------------------------

def load_classes(location: str, key: str = "data.classes") -> list[str]:
    """The class list (a JSON list of names; index = position) at a path or URL."""
    try:
        with contextlib.closing(open_location(location)) as stream:
            raw = stream.read(MAX_CLASS_LIST_BYTES + 1)
        if len(raw) > MAX_CLASS_LIST_BYTES:
            raise ConfigError(f"larger than {MAX_CLASS_LIST_BYTES >> 20} MiB")
        names = json.loads(raw)
    except Exception as exc:
        raise ConfigError(f"{key}: cannot read the class list {location} ({_first_line(exc)})") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{key}: {location} is not a JSON list of class names")
    if len(set(names)) != len(names):
        raise ConfigError(f"{key}: {location} names some classes twice")
    return names


def class_index(classes: Sequence[str] | None) -> dict[str, int] | None:
    """Class name → index (its position in the list); None without a list."""
    return {name: i for i, name in enumerate(classes)} if classes is not None else None


def label_index(raw: bytes, classes: dict[str, int] | None) -> int:
    """A sample's ``cls``: an integer as text, or a class name looked up in ``classes``."""
    text = raw.decode("utf-8", errors="replace").strip()
    with contextlib.suppress(ValueError):
        return int(text)
    if classes is None:
        raise ShardError(f"label {text!r} is a class name but data.classes names no class list")
    if text not in classes:
        raise ShardError(f"label {text!r} is not in the class list (data.classes)")
    return classes[text]


# --- checks and pipeline ----------------------------------------------------------------------

def check_shard(path: str, key: str, classes: Sequence[str] | None = None) -> None:
    """Fail early, with a clear message, if ``path`` is not a WebDataset shard of labelled images."""
    names: list[str] = []
    first_label: bytes | None = None
    try:
        with contextlib.closing(open_location(path)) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in itertools.islice(tar, 64):
                names.append(member.name)
                if first_label is None and member.name.endswith(".cls") and member.isreg():
                    _check_entry_size(member)
                    extracted = tar.extractfile(member)
                    first_label = extracted.read() if extracted is not None else None
    except (OSError, tarfile.TarError, ShardError) as exc:
        raise ConfigError(f"{key}: {path} is not a readable tar shard ({exc})") from None
    except Exception as exc:  # google.api_core errors (404, 403, …) after the library's retries
        raise ConfigError(f"{key}: {path} cannot be read ({_first_line(exc)})") from None
    suffixes = {name.rsplit(".", 1)[-1].lower() for name in names if "." in name}
    if not suffixes & set(IMAGE_KEYS) or "cls" not in suffixes:
        raise ConfigError(f"{key}: {path} has no samples with an image ({'/'.join(IMAGE_KEYS)}) and a 'cls' label "
                          f"(first entries: {', '.join(names[:4]) or 'none'})")
    if first_label is not None:
        try:
            label_index(first_label, class_index(classes))
        except ShardError as exc:
            raise ConfigError(f"{key}: {path}: {exc}") from None


def check_location(url: str, shards: Sequence[str], key: str, classes: Sequence[str] | None = None) -> None:
    """ConfigError unless one of the first few shards of ``url`` reads as a labelled shard."""
    if is_folder_tree(url):
        return  # resolve_shards listed it and found images
    first: ConfigError | None = None
    for shard in shards[:CHECK_ATTEMPTS]:
        try:
            check_shard(shard, key, classes)
            return
        except ConfigError as exc:
            first = first or exc
            log.warning("%s", exc)
    assert first is not None
    reason = str(first).split(": ", 1)[-1]
    raise ConfigError(f"{key}: no shard of {url} could be read: {reason}")


class ShardReader:
    """Turns a stream of ``{"url": shard}`` into raw samples, skipping and counting shards that fail.

    Picklable (a loader worker gets a copy); all connections are made inside the worker.
    """

    def __init__(self, key: str = "data", location: str = "", classes: list[str] | None = None,
                 tally: ShardTally | None = None, shard_count: int = 0) -> None:
        self.key, self.location = key, location
        self.classes = class_index(classes)
        self.tally = tally
        self.shard_count = shard_count  # distinct shards drawn from; 0: unknown
        self.policy = read_policy.current()  # travels to loader workers with the reader

    def __call__(self, sources: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        # 404s, and when: drawing them again soon cannot help, but a shard re-uploaded (or replaced
        # while we read it, which fails the pinned generation) is worth another try later.
        missing: dict[str, float] = {}
        failures = 0
        last_error = ""
        for source in sources:
            url = source["url"]
            if url in missing and time.monotonic() - missing[url] < MISSING_RETRY_S:
                continue
            try:
                yield from self._read(url)
            except Exception as exc:
                last_error = _first_line(exc)
                log.warning("%s: skipping shard %s: %s", self.key, url, last_error)
                if self.tally is not None:
                    self.tally.add_failure()
                if is_missing(exc):
                    missing[url] = time.monotonic()
                failures += 1
                if 0 < self.shard_count <= len(missing):
                    self._give_up(f"all {self.shard_count} are missing, the last with: {last_error}")
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    self._give_up(f"{failures} shards failed in a row, the last with: {last_error}")
            else:
                failures = 0
                missing.pop(url, None)

    def _read(self, url: str) -> Iterator[dict[str, Any]]:
        with contextlib.closing(open_location(url, self.policy)) as stream:
            for sample in group_by_keys(tar_entries(stream, url)):
                if "cls" in sample:
                    sample["cls"] = str(label_index(sample["cls"], self.classes)).encode()
                yield sample

    def _give_up(self, why: str) -> None:
        raise NoReadableShards(f"{self.key}: no shard of {self.location or 'the data location'} could be read: {why}")


def tar_entries(stream: IO[bytes], url: str) -> Iterator[dict[str, Any]]:
    """``{"fname", "data", "__url__"}`` for each regular entry of a tar stream (webdataset's form), each checked
    against MAX_TAR_ENTRY_BYTES (MAX_LABEL_BYTES for ``.cls``) before it is read: ShardError when too large."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isreg() or _META_ENTRY.match(member.name):
                continue
            _check_entry_size(member)
            extracted = tar.extractfile(member)
            if extracted is None:
                continue
            yield {"fname": member.name, "data": extracted.read(), "__url__": url}
            tar.members = []  # type: ignore[attr-defined]  # a stream of 100,000s of entries: keep no list of them


def _check_entry_size(member: tarfile.TarInfo) -> None:
    limit = MAX_LABEL_BYTES if member.name.endswith(".cls") else MAX_TAR_ENTRY_BYTES
    if member.size > limit:
        raise ShardError(f"entry {member.name[:100]!r} declares {member.size} bytes; entries over {limit} bytes "
                         "are refused")


def samples_from_shards(sources: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Raw samples (``{"__key__", "png", "cls", ...}``) from a stream of ``{"url": path}`` shards."""
    return ShardReader()(sources)


def _raw_samples(shards: list[str], key: str, location: str, classes: list[str] | None, tally: ShardTally | None,
                 cache_dir: str) -> list[Any]:
    """Pipeline stages yielding raw samples: random shards, or random files of a folder tree."""
    if is_folder_tree(location):
        return [TreeReader(location, str(index_path(location, cache_dir)), key, classes, tally)]
    # Non-deterministic seeding: every peer (and every restart) draws its own shard sequence.
    return [wds.ResampledShards(shards, deterministic=False),
            ShardReader(key, location, classes, tally, shard_count=len(set(shards)))]


def train_dataset(shards: list[str], image_size: int, *, key: str = "data.train", location: str = "",
                  classes: list[str] | None = None, tally: ShardTally | None = None,
                  cache_dir: str = "", augment: str = "random-resized-crop") -> wds.DataPipeline:
    """An endless stream of (uint8 CHW image, class index) from randomly drawn shards (or tree files)."""
    return wds.DataPipeline(
        *_raw_samples(shards, key, location, classes, tally, cache_dir),
        wds.shuffle(SHUFFLE_BUFFER),
        wds.decode("pil", handler=wds.warn_and_continue),
        wds.to_tuple(";".join(IMAGE_KEYS), "cls", handler=wds.warn_and_continue),
        wds.map_tuple(train_transform(image_size, augment), int),
    )


def train_batches(shards: list[str], image_size: int, batch_size: int, workers: int, *, key: str = "data.train",
                  location: str = "", classes: list[str] | None = None, tally: ShardTally | None = None,
                  cache_dir: str = "", augment: str = "random-resized-crop") -> Iterator[Batch]:
    """Endless batches; call before starting hivemind so loader workers fork from a quiet process.

    ``location`` (the spec's URL, for messages), ``classes`` (names of string labels) and
    ``tally`` (failed shards) go to the ShardReader; ``cache_dir`` holds folder-tree indexes. Raises ConfigError (from ``next``)
    once the data location turns out unreadable.
    """
    loader = DataLoader(
        train_dataset(shards, image_size, key=key, location=location, classes=classes, tally=tally,
                      cache_dir=cache_dir, augment=augment),
        batch_size=batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    batches = _unwrap_worker_errors(iter(loader))
    # Without workers the step would wait for every decode: overlap them in a thread instead.
    return batches if workers > 0 else Prefetcher(batches, depth=PREFETCH_BATCHES, name="train-prefetch")


def val_dataset(shards: list[str], image_size: int, *, key: str = "data.val", location: str = "",
                classes: list[str] | None = None) -> wds.DataPipeline:
    """One pass over the val shards in the order given, samples in file order: every run sees the same images."""
    return wds.DataPipeline(
        wds.SimpleShardList(shards),
        ShardReader(key, location, classes, shard_count=len(set(shards))),
        wds.decode("pil", handler=wds.warn_and_continue),
        wds.to_tuple(";".join(IMAGE_KEYS), "cls", handler=wds.warn_and_continue),
        wds.map_tuple(val_transform(image_size), int),
    )


def val_batches(shards: list[str], image_size: int, batch_size: int, *, key: str = "data.val", location: str = "",
                classes: list[str] | None = None) -> Prefetcher[Batch]:
    """The val set as batches, decoded in a background thread (no forked workers: hivemind runs by now).

    Close it (``with``) when stopping early; the thread then ends.
    """
    loader = DataLoader(val_dataset(shards, image_size, key=key, location=location, classes=classes),
                        batch_size=batch_size, num_workers=0)
    return Prefetcher(_unwrap_worker_errors(iter(loader)), depth=PREFETCH_BATCHES, name="val-prefetch")


def _unwrap_worker_errors(batches: Iterator[Batch]) -> Iterator[Batch]:
    try:
        yield from batches
    except NoReadableShards as exc:
        # From a worker, torch re-raises it with the worker's whole traceback as the message;
        # the daemon shows one line, so keep the original one (the traceback's last).
        line = str(exc).strip().splitlines()[-1]
        raise ConfigError(line.split(f"{NoReadableShards.__name__}: ", 1)[-1]) from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
