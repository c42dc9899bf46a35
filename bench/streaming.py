"""Streaming: samples/s of the training pipeline reading the same data from local disk and from gs://.

    python bench/streaming.py [--shards 8] [--per-shard 250] [--size 96] [--workers 2] [--seconds 20]

Writes WebDataset shards of JPEGs (``--size`` pixels square, so decoding costs what it
costs on real data) plus the same images as a raw folder tree, uploads both to
fake-gcs-server on loopback, and times the trainer's own pipeline (``train_batches``:
draw, read, shuffle, decode, augment, batch) on each. The goal is gs:// >= 0.9x local
for these decode-bound pipelines. The emulator is a local Go process, so the ratio
measures our client-side overhead (connections, ranged reads, per-object requests),
not a real bucket's latency.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hivemindd.trainer.data import resolve_shards, train_batches
from tests.gcs_emulator import GcsEmulator

BATCH = 32


def make_data(root: Path, shards: int, per_shard: int, size: int) -> tuple[Path, Path]:
    """(shard dir, tree dir) holding the same JPEGs: 10 classes of noisy colour fields."""
    rng = np.random.default_rng(0)
    shard_dir, tree = root / "shards", root / "tree"
    shard_dir.mkdir(parents=True)
    for s in range(shards):
        with tarfile.open(shard_dir / f"train-{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                cls = int(rng.integers(10))
                pixels = np.clip(rng.normal(cls * 25, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
                key = f"s{s:03d}_{i:05d}"
                for name, payload in ((f"{key}.jpg", buf.getvalue()), (f"{key}.cls", str(cls).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                (tree / f"c{cls:02d}").mkdir(parents=True, exist_ok=True)
                (tree / f"c{cls:02d}" / f"{key}.JPEG").write_bytes(buf.getvalue())
    return shard_dir, tree


def upload(emulator_bucket: str, shard_dir: Path, tree: Path) -> None:
    from google.cloud import storage

    client = storage.Client()
    bucket = client.bucket(emulator_bucket)
    for path in sorted(shard_dir.iterdir()):
        bucket.blob(f"shards/{path.name}").upload_from_filename(str(path))
    for path in sorted(tree.rglob("*.JPEG")):
        bucket.blob(f"tree/{path.relative_to(tree)}").upload_from_filename(str(path))
    client.close()


def rate(location: str, cache: Path, size: int, workers: int, seconds: float) -> float:
    """Samples per second through the training pipeline, after a warm-up of a few batches."""
    shards = resolve_shards(location, "data.train", str(cache))
    batches = train_batches(shards, size, BATCH, workers, location=location, cache_dir=str(cache))
    for _ in range(3 * max(workers, 1)):
        next(batches)
    started, samples = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        samples += int(next(batches)[1].shape[0])
    elapsed = time.perf_counter() - started
    close = getattr(batches, "close", None)
    if close is not None:
        close()
    return samples / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--size", type=int, default=96, help="stored image side in pixels")
    parser.add_argument("--crop", type=int, default=64, help="training image_size")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hmb-stream-", dir="/tmp"))
    emulator = GcsEmulator(root / "gcs").start()
    os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
    emulator.create_bucket("bench")
    try:
        shard_dir, tree = make_data(root / "data", args.shards, args.per_shard, args.size)
        upload("bench", shard_dir, tree)
        last = f"{args.shards - 1:06d}"
        pairs = [
            ("shards", f"{shard_dir}/train-{{000000..{last}}}.tar", f"gs://bench/shards/train-{{000000..{last}}}.tar"),
            ("folder tree", f"{tree}/", "gs://bench/tree/"),
        ]
        print(f"{args.shards} shards x {args.per_shard} JPEGs of {args.size}px, crop {args.crop}, batch {BATCH}, "
              f"{args.workers} loader workers, {args.seconds:.0f} s per measurement")
        for name, local, remote in pairs:
            local_rate = rate(local, root / "cache", args.crop, args.workers, args.seconds)
            remote_rate = rate(remote, root / "cache", args.crop, args.workers, args.seconds)
            print(f"{name:<12} local {local_rate:7.1f} samples/s   gs:// {remote_rate:7.1f} samples/s   "
                  f"ratio {remote_rate / local_rate:.2f}x (goal >= 0.90x)")
    finally:
        emulator.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
