"""Training from the bucket, as a user does it: pack with hmctl, upload, train a real trainer from gs://.

Both layouts a user can point ``[data] train`` at are covered: packed shards (with a
``classes.json`` naming the labels) and a raw folder tree of JPEGs.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_trainer_process import Trainer, make_launch

CLASSES = ("n02", "n01", "n03")


def make_imagefolder(root: Path, per_class: int = 8) -> None:
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(80 * c + 40, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.JPEG", format="JPEG")


def hmctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hivemindd.cli", *args], capture_output=True, text=True, timeout=120)


def train_until_steps(trainer: Trainer, steps: int) -> dict[str, object]:
    trainer.wait_type("started", timeout=90)
    assert trainer.wait_type("resumed")["source"] == "fresh"
    progress = trainer.wait_for(lambda e: e["type"] == "progress" and e["step"] >= steps, timeout=90)
    trainer.proc.send_signal(signal.SIGTERM)
    assert trainer.wait_exit() == 0
    return progress


@pytest.mark.timeout(200)
def test_pack_upload_train_round_trip(gcs: object, short_tmp: Path, demo_cache: Path, bootstrap: list[str],
                                      process_groups: list[int]) -> None:
    src = short_tmp / "imagenet-train"
    make_imagefolder(src)
    packed = hmctl("dataset", "pack", str(src), "gs://test-bucket/packs/tiny", "--shard-size", "8", "--json")
    assert packed.returncode == 0, packed.stderr
    summary = json.loads(packed.stdout)
    assert summary["shards"] == 3
    changes = {
        "model": {"num_classes": 3},
        "data": {"train": "gs://test-bucket/packs/tiny/train-{000000..000002}.tar", "train_samples": 24,
                 "classes": "gs://test-bucket/packs/tiny/classes.json"},
    }
    trainer = Trainer(make_launch(short_tmp, demo_cache, bootstrap, changes=changes), process_groups)
    progress = train_until_steps(trainer, 6)
    assert progress["shards_failed"] == 0
    assert progress["loss"] is not None and 0 < float(progress["loss"]) < 10  # type: ignore[arg-type]


@pytest.mark.timeout(200)
def test_train_from_a_raw_jpeg_tree_in_the_bucket(gcs: object, short_tmp: Path, bootstrap: list[str],
                                                  process_groups: list[int]) -> None:
    from google.cloud import storage

    src = short_tmp / "tree"
    make_imagefolder(src, per_class=4)
    client = storage.Client()
    bucket = client.bucket("test-bucket")
    for path in sorted(src.rglob("*.JPEG")):
        bucket.blob(f"ILSVRC2012_img_train/{path.relative_to(src)}").upload_from_filename(str(path))
    client.close()
    changes = {
        "model": {"num_classes": 3},
        "data": {"train": "gs://test-bucket/ILSVRC2012_img_train/", "train_samples": 12},
    }
    cache = short_tmp / "cache"  # its own: an index is keyed by URL, and other tests reuse bucket names
    trainer = Trainer(make_launch(short_tmp, cache, bootstrap, changes=changes), process_groups)
    progress = train_until_steps(trainer, 6)
    assert progress["shards_failed"] == 0
    assert len(list((cache / "folder-index").glob("*.json.gz"))) == 1  # listed once, cached for the next start
