"""scikit-learn's bundled 8×8 handwritten digits, packed as real WebDataset shards for trainer tests.

1,797 labelled images ship inside scikit-learn (no download). A fixed split: 297 val
images, the rest for training; pixel values 0..16 scaled to 0..255 PNGs.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

VAL_SAMPLES = 297
TRAIN_SHARDS = 3
_MTIME = 1_700_000_000


@dataclass(frozen=True)
class DigitShards:
    train: str  # brace pattern
    val: str
    train_samples: int
    val_samples: int


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray((pixels * (255 / 16)).round().astype(np.uint8), mode="L").save(out, format="PNG")
    return out.getvalue()


def _write_shard(path: Path, samples: list[tuple[str, bytes, int]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, png, label in samples:
            for suffix, data in ((".png", png), (".cls", str(label).encode())):
                info = tarfile.TarInfo(key + suffix)
                info.size, info.mtime = len(data), _MTIME
                tar.addfile(info, io.BytesIO(data))


def pack_digits(root: Path) -> DigitShards:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.RandomState(0).permutation(len(digits.target))
    samples = [(f"digit{i:05d}", _png(digits.images[i]), int(digits.target[i])) for i in order]
    val, train = samples[:VAL_SAMPLES], samples[VAL_SAMPLES:]
    root.mkdir(parents=True, exist_ok=True)
    _write_shard(root / "val-0.tar", val)
    per_shard = -(-len(train) // TRAIN_SHARDS)
    for n in range(TRAIN_SHARDS):
        _write_shard(root / f"train-{n}.tar", train[n * per_shard:(n + 1) * per_shard])
    return DigitShards(train=str(root / f"train-{{0..{TRAIN_SHARDS - 1}}}.tar"), val=str(root / "val-0.tar"),
                       train_samples=len(train), val_samples=len(val))
