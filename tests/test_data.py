"""Data locations, brace expansion, the demo set and the training pipeline."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from hivemindd.trainer import data, demo_data
from hivemindd.trainer.data import check_shard, expand_braces, resolve_shards, samples_from_shards, train_batches
from hivemindd.trainer.errors import ConfigError


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def make_shard(path: Path, labels: list[int]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, label in enumerate(labels):
            image = io.BytesIO()
            Image.new("RGB", (12, 12), (label * 20, 0, 0)).save(image, format="PNG")
            for name, data in ((f"s{i}.png", image.getvalue()), (f"s{i}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_brace_expansion_keeps_zero_padding() -> None:
    assert expand_braces("/d/train-{000000..000002}.tar") == [
        "/d/train-000000.tar", "/d/train-000001.tar", "/d/train-000002.tar"]
    assert expand_braces("/d/x.tar") == ["/d/x.tar"]
    assert len(expand_braces("/d/train-{000000..000640}.tar")) == 641


@pytest.mark.parametrize("prefix", ["", "file://"])
def test_resolve_plain_paths_and_file_urls(tmp_path: Path, prefix: str) -> None:
    for i in (0, 1, 2):
        make_shard(tmp_path / f"s-{i}.tar", [0])
    assert resolve_shards(f"{prefix}{tmp_path}/s-{{0..2}}.tar", "data.train", str(tmp_path)) == [
        str(tmp_path / f"s-{i}.tar") for i in (0, 1, 2)]


def test_some_missing_shards_are_skipped(tmp_path: Path) -> None:
    make_shard(tmp_path / "s-1.tar", [0])
    assert resolve_shards(f"{tmp_path}/s-{{0..3}}.tar", "data.train", str(tmp_path)) == [str(tmp_path / "s-1.tar")]


def test_no_shards_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data\.train: no shards match .*/x/train-\{0\.\.3\}\.tar$"):
        resolve_shards(f"{tmp_path}/x/train-{{0..3}}.tar", "data.train", str(tmp_path))


@pytest.mark.parametrize(("url", "words"), [
    ("file://otherhost/data/train.tar", "must be local"),
    ("demo://shapes/test", "not a demo set"),
])
def test_unsupported_locations(tmp_path: Path, url: str, words: str) -> None:
    with pytest.raises(ConfigError, match="^data.val: .*" + words.replace("/", ".")):
        resolve_shards(url, "data.val", str(tmp_path))


def test_not_a_shard_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"hello")
    with pytest.raises(ConfigError, match=r"data\.train: .*bad\.tar is not a readable tar shard"):
        check_shard(str(bad), "data.train")
    with tarfile.open(tmp_path / "nolabels.tar", "w") as tar:
        info = tarfile.TarInfo("a.txt")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(ConfigError, match="no samples with an image"):
        check_shard(str(tmp_path / "nolabels.tar"), "data.train")


def test_demo_generation_is_deterministic(tmp_path: Path, demo_cache: Path) -> None:
    (tmp_path / "again").mkdir()
    demo_data.write_demo_shards(tmp_path / "again")
    assert digest(tmp_path / "again") == digest(demo_cache / demo_data.DATASET_DIR)


def test_demo_samples_decode_with_every_label(demo_cache: Path) -> None:
    shards = resolve_shards("demo://shapes/train", "data.train", str(demo_cache))
    assert len(shards) == demo_data.TRAIN_SHARDS
    samples = wds.DataPipeline(wds.SimpleShardList(shards), samples_from_shards, wds.decode("pil"),
                               wds.to_tuple("png", "cls"))
    labels = []
    for image, label in samples:
        assert image.size == (demo_data.IMAGE_SIZE, demo_data.IMAGE_SIZE) and image.mode == "RGB"
        labels.append(label)
    assert len(labels) == demo_data.TRAIN_SAMPLES
    assert set(labels) == set(range(demo_data.NUM_CLASSES))
    # Roughly balanced: every class has at least half its fair share.
    assert min(labels.count(c) for c in range(10)) > demo_data.TRAIN_SAMPLES / 20
    val = resolve_shards("demo://shapes/val", "data.val", str(demo_cache))
    assert val == [str(demo_cache / demo_data.DATASET_DIR / "val-00000.tar")]


def _generate(cache: str) -> str:
    return demo_data.ensure_demo_shards(cache).train


def test_trainers_generating_together_agree(tmp_path: Path, demo_cache: Path) -> None:
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(_generate, [str(tmp_path)] * 2)
    assert results[0] == results[1]
    assert [p.name for p in tmp_path.iterdir()] == [demo_data.DATASET_DIR]  # no temp dirs left
    assert digest(tmp_path / demo_data.DATASET_DIR) == digest(demo_cache / demo_data.DATASET_DIR)


def test_train_batches(demo_cache: Path) -> None:
    shards = resolve_shards("demo://shapes/train", "data.train", str(demo_cache))
    images, labels = next(train_batches(shards, image_size=24, batch_size=16, workers=0))
    # uint8 off the loader; the trainer normalises on its device (trainer/transforms.py)
    assert images.shape == (16, 3, 24, 24) and images.dtype == torch.uint8
    assert labels.shape == (16,) and labels.dtype == torch.int64
    assert int(labels.min()) >= 0 and int(labels.max()) < 10
    assert int(images.max()) > 100  # pixel values, not normalised floats


def test_train_batches_with_workers(tmp_path: Path) -> None:
    make_shard(tmp_path / "a.tar", [1, 2, 3])
    make_shard(tmp_path / "b.tar", [4, 5])
    batches = train_batches([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], image_size=8, batch_size=4, workers=2)
    seen: set[int] = set()
    for _ in range(10):  # resampled: the stream never ends
        _, labels = next(batches)
        seen.update(int(x) for x in labels)
    assert seen == {1, 2, 3, 4, 5}


# --- issue 11 item 6: bounded tar entries and class lists, regular files only ---------------------

def _tar_with(path: Path, entries: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.skipif(shutil.which("tar") is None or "GNU" not in subprocess.run(
    ["tar", "--version"], capture_output=True, text=True).stdout, reason="needs GNU tar for a sparse entry")
def test_a_small_shard_declaring_a_20_gb_sparse_label_is_refused_unread(tmp_path: Path) -> None:
    """10 KB on disk, 20 GB once read: tarfile fills the holes with zeros; the entry is refused by its header."""
    big = tmp_path / "s0.cls"
    with open(big, "wb") as f:
        f.truncate(20 << 30)
    subprocess.run(["tar", "--sparse", "-cf", str(tmp_path / "sparse.tar"), "-C", str(tmp_path), "s0.cls"], check=True)
    assert (tmp_path / "sparse.tar").stat().st_size < 100_000
    tally = data.ShardTally()
    assert list(data.ShardReader(tally=tally)([{"url": str(tmp_path / "sparse.tar")}])) == []
    assert tally.failed == 1
    with open(tmp_path / "sparse.tar", "rb") as stream, \
            pytest.raises(data.ShardError, match=r"'s0\.cls' declares 21474836480 bytes; entries over 1024 bytes"):
        list(data.tar_entries(stream, "x"))
    with pytest.raises(ConfigError, match=r"data\.train: .*sparse\.tar is not a readable tar shard .*declares"):
        check_shard(str(tmp_path / "sparse.tar"), "data.train")


def test_an_oversized_entry_fails_its_shard_before_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "MAX_TAR_ENTRY_BYTES", 4000)
    image = io.BytesIO()
    Image.new("RGB", (12, 12)).save(image, format="PNG")
    _tar_with(tmp_path / "big.tar", [("a.png", image.getvalue()), ("a.cls", b"1"),
                                     ("b.png", b"\0" * 5000), ("b.cls", b"2")])
    tally = data.ShardTally()
    samples = list(data.ShardReader(tally=tally)([{"url": str(tmp_path / "big.tar")}]))
    assert samples == [] and tally.failed == 1  # skipped and counted, b.png never read


def test_a_class_list_larger_than_the_cap_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "MAX_CLASS_LIST_BYTES", 1000)
    (tmp_path / "classes.json").write_text(json.dumps([f"class-{i}" for i in range(200)]))
    with pytest.raises(ConfigError, match=r"^data\.classes: cannot read the class list .* \(larger than"):
        data.load_classes(str(tmp_path / "classes.json"))


def test_a_class_list_that_is_a_fifo_or_a_device_is_refused_at_once(tmp_path: Path) -> None:
    """Opening a FIFO for reading blocks until a writer comes; /dev/zero never ends. Neither is a regular file."""
    os.mkfifo(tmp_path / "fifo.json")
    os.symlink("/dev/zero", tmp_path / "zero.json")
    errors: list[str] = []

    def load_all() -> None:
        for name in ("fifo.json", "zero.json"):
            try:
                data.load_classes(str(tmp_path / name))
            except ConfigError as exc:
                errors.append(str(exc))

    worker = threading.Thread(target=load_all, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "load_classes blocked on a FIFO"
    assert "fifo.json is not a regular file" in errors[0]
    assert "a run spec may not read /dev" in errors[1]  # the symlink is followed before anything is opened


def test_a_fifo_among_the_shards_is_skipped_not_waited_on(tmp_path: Path) -> None:
    make_shard(tmp_path / "s-0.tar", [1])
    os.mkfifo(tmp_path / "s-1.tar")
    tally = data.ShardTally()
    got: list[dict[str, object]] = []
    worker = threading.Thread(target=lambda: got.extend(data.ShardReader(tally=tally)(
        [{"url": str(tmp_path / "s-1.tar")}, {"url": str(tmp_path / "s-0.tar")}])), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive() and len(got) == 1 and tally.failed == 1
