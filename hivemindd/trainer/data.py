"""Training data: shard locations, brace expansion and the WebDataset pipeline.

Every peer draws shards at random, with its own seed, forever (``ResampledShards``):
peers need no coordination over who reads what, and a restarted peer simply draws
anew. One dataset epoch is therefore a number of samples (``data.train_samples``),
not a pass over the files.
"""

from __future__ import annotations

import itertools
import logging
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import DataLoader
from torchvision import transforms
from webdataset.tariterators import group_by_keys, tar_file_expander

from hivemindd.trainer.demo_data import ensure_demo_shards
from hivemindd.trainer.errors import ConfigError

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SHUFFLE_BUFFER = 1000  # samples; mixes consecutive shards without costing much memory

Batch = tuple[torch.Tensor, torch.Tensor]


def expand_braces(pattern: str) -> list[str]:
    """``a-{00..02}.tar`` → ``[a-00.tar, a-01.tar, a-02.tar]`` (zero padding kept)."""
    return list(braceexpand.braceexpand(pattern))


def resolve_shards(url: str, key: str, cache_dir: str) -> list[str]:
    """Local shard paths for a spec data location; ConfigError naming ``key`` if there are none."""
    pattern = _local_pattern(url, key, cache_dir)
    paths = expand_braces(pattern)
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
    if url.startswith("gs://"):
        raise ConfigError(f"{key}: {url} is on Google Cloud Storage; gs:// data arrives with the GCS support, "
                          "use a local path or file:// for now")
    if url.startswith(("https://", "http://")):
        raise ConfigError(f"{key}: {url} is remote; https:// data arrives with HTTP streaming support, "
                          "use a local path or file:// for now")
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


def check_shard(path: str, key: str) -> None:
    """Fail early, with a clear message, if ``path`` is not a WebDataset shard of labelled images."""
    try:
        with tarfile.open(path) as tar:
            names = [m.name for m in itertools.islice(tar, 64)]
    except (OSError, tarfile.TarError) as exc:
        raise ConfigError(f"{key}: {path} is not a readable tar shard ({exc})") from None
    suffixes = {name.rsplit(".", 1)[-1].lower() for name in names if "." in name}
    if not suffixes & set(IMAGE_KEYS) or "cls" not in suffixes:
        raise ConfigError(f"{key}: {path} has no samples with an image ({'/'.join(IMAGE_KEYS)}) and a 'cls' label "
                          f"(first entries: {', '.join(names[:4]) or 'none'})")


def train_transform(image_size: int) -> transforms.Compose:
    """ImageNet-standard training augmentation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def samples_from_shards(sources: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Raw samples (``{"__key__", "png", "cls", ...}``) from a stream of ``{"url": path}`` shards."""
    # One bad shard or sample in a big dataset should cost a warning, not the run.
    files = tar_file_expander(_open_shards(sources), handler=wds.warn_and_continue)
    return group_by_keys(files, handler=wds.warn_and_continue)


def _open_shards(sources: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    # webdataset's own opener never closes its files; over an endless stream that is a
    # file handle per shard left to the garbage collector.
    for source in sources:
        try:
            stream = open(source["url"], "rb")  # noqa: SIM115  # closed when the next shard is asked for
        except OSError as exc:
            log.warning("skipping shard %s: %s", source["url"], exc)
            continue
        with stream:
            yield {**source, "stream": stream}


def train_dataset(shards: list[str], image_size: int) -> wds.DataPipeline:
    """An endless stream of (image tensor, class index) from randomly drawn shards."""
    return wds.DataPipeline(
        # Non-deterministic seeding: every peer (and every restart) draws its own shard sequence.
        wds.ResampledShards(shards, deterministic=False),
        samples_from_shards,
        wds.shuffle(SHUFFLE_BUFFER),
        wds.decode("pil", handler=wds.warn_and_continue),
        wds.to_tuple(";".join(IMAGE_KEYS), "cls", handler=wds.warn_and_continue),
        wds.map_tuple(train_transform(image_size), int),
    )


def train_batches(shards: list[str], image_size: int, batch_size: int, workers: int) -> Iterator[Batch]:
    """Endless batches; call before starting hivemind so loader workers fork from a quiet process."""
    loader = DataLoader(
        train_dataset(shards, image_size),
        batch_size=batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    return iter(loader)
