"""The shards' content: the global shuffle, and reproducible tar bytes (so a size check means complete)."""

from __future__ import annotations

import io
import itertools
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from hivemindd.tools.dataset_pack.sources import Sample, Source

TAR_BLOCK, TAR_RECORD = 512, 512 * 20


def shuffled_shards(samples: list[Sample], seed: int, shard_size: int) -> list[list[Sample]]:
    """Sort by key, shuffle with the seed, cut into shards: the same input always gives the same shards."""
    order = sorted(samples, key=lambda s: s.key)
    keys = [s.key for s in order]
    duplicates = {a for a, b in itertools.pairwise(keys) if a == b}
    if duplicates:
        raise click.ClickException(f"two images map to the same key: {', '.join(sorted(duplicates)[:5])}")
    random.Random(seed).shuffle(order)
    return [order[i:i + shard_size] for i in range(0, len(order), shard_size)]


def _members(shard: list[Sample], source: Source) -> Iterator[tuple[str, bytes]]:
    for s in shard:
        yield f"{s.key}.{s.ext}", source.read(s)
        yield f"{s.key}.cls", str(s.cls).encode()


def _tar_info(name: str, size: int) -> Any:
    import tarfile

    # fixed metadata: the same samples always give the same bytes
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "", ""
    return info


def expected_tar_size(shard: list[Sample], source: Source) -> int:
    """The exact size write_shard produces, from the member sizes alone (headers, 512-byte padding, end record)."""
    import tarfile

    total = 0
    for s in shard:
        for name, size in ((f"{s.key}.{s.ext}", source.size(s)), (f"{s.key}.cls", len(str(s.cls)))):
            header = _tar_info(name, size).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
            total += len(header) + -(-size // TAR_BLOCK) * TAR_BLOCK
    total += 2 * TAR_BLOCK
    return -(-total // TAR_RECORD) * TAR_RECORD


def write_shard(path: Path, shard: list[Sample], source: Source) -> None:
    import tarfile

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
        for name, data in _members(shard, source):
            tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))


def write_shard_to(path: Path, shard: list[Sample], source: Source) -> None:
    """``write_shard``, looked up when called: the seam a test replaces to interrupt a pack."""
    write_shard(path, shard, source)
