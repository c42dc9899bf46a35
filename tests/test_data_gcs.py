"""Shards from gs:// (against fake-gcs-server) and http(s)://: same samples as local, skipped and counted failures."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from hivemindd.trainer import data, read_policy, storage
from hivemindd.trainer.data import (
    ShardReader,
    ShardTally,
    check_location,
    check_shard,
    load_classes,
    resolve_shards,
    samples_from_shards,
    train_batches,
)
from hivemindd.trainer.errors import ConfigError
from hivemindd.trainer.storage import open_location
from tests.test_data import make_shard

BUCKET = "test-bucket"
Upload = Callable[[str, bytes], str]


@pytest.fixture
def upload(gcs: object) -> Iterator[Callable[[str, bytes], str]]:
    """Puts an object into the emulator's bucket; returns its gs:// URL."""
    from google.cloud import storage

    # No credentials given: with STORAGE_EMULATOR_HOST set the library must go anonymous by itself.
    client = storage.Client()
    bucket = client.bucket(BUCKET)

    def put(name: str, payload: bytes) -> str:
        bucket.blob(name).upload_from_string(payload)
        return f"gs://{BUCKET}/{name}"

    yield put
    client.close()


def make_named_shard(path: Path, labels: list[str]) -> None:
    """A shard whose ``cls`` entries are class names (synsets), not indices."""
    with tarfile.open(path, "w") as tar:
        for i, label in enumerate(labels):
            image = io.BytesIO()
            Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(image, format="PNG")
            for name, payload in ((f"n{i}.png", image.getvalue()), (f"n{i}.cls", label.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def raw_samples(urls: list[str]) -> list[tuple[str, bytes, bytes]]:
    return [(s["__key__"], s["png"], s["cls"]) for s in samples_from_shards({"url": u} for u in urls)]


def read_all(reader: ShardReader, urls: list[str]) -> list[dict[str, Any]]:
    return list(reader({"url": u} for u in urls))


def test_gs_shards_give_the_same_samples_as_local_files(upload: Upload, demo_cache: Path) -> None:
    local = resolve_shards("demo://shapes/train", "data.train", str(demo_cache))
    for path in local:
        upload(f"demo/{Path(path).name}", Path(path).read_bytes())
    url = f"gs://{BUCKET}/demo/train-{{00000..{len(local) - 1:05d}}}.tar"
    remote = resolve_shards(url, "data.train", str(demo_cache))
    assert [u.rsplit("/", 1)[1] for u in remote] == [Path(p).name for p in local]
    check_location(url, remote, "data.train")
    from_gs = raw_samples(remote)
    assert from_gs == raw_samples(local)
    assert len(from_gs) > 100


def test_missing_and_corrupt_shards_are_skipped_and_counted(upload: Upload, tmp_path: Path) -> None:
    make_shard(tmp_path / "good.tar", [1, 2, 3])
    good = (tmp_path / "good.tar").read_bytes()
    upload("x/s-0.tar", good)
    upload("x/s-1.tar", b"this is not a tar file" * 100)  # corrupt
    upload("x/s-2.tar", good[:2600])  # cut short in the second sample's image
    upload("x/s-4.tar", good)  # s-3.tar does not exist
    urls = [f"gs://{BUCKET}/x/s-{i}.tar" for i in range(5)]
    tally = ShardTally()
    reader = ShardReader("data.train", f"gs://{BUCKET}/x/s-{{0..4}}.tar", tally=tally, shard_count=5)
    samples = read_all(reader, urls)
    from_good = [s for s in samples if s["__url__"] in (urls[0], urls[4])]
    assert [s["cls"] for s in from_good] == [b"1", b"2", b"3"] * 2
    assert tally.failed == 3  # corrupt, truncated, missing
    # The up-front check passes over unreadable shards to a good one.
    check_location("gs://x", [urls[3], urls[1], urls[0]], "data.train")


def test_a_missing_shard_is_skipped_then_read_once_it_appears(upload: Upload, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A 404 rests the shard for a while (data.MISSING_RETRY_S), not forever: uploads and replacements heal."""
    make_shard(tmp_path / "good.tar", [1, 2])
    good = (tmp_path / "good.tar").read_bytes()
    upload("late/s-0.tar", good)
    urls = [f"gs://{BUCKET}/late/s-{i}.tar" for i in (0, 1)]
    reader = ShardReader("data.train", "gs://late", tally=ShardTally(), shard_count=2)
    monkeypatch.setattr(data, "MISSING_RETRY_S", 3600.0)
    rested = [s["__url__"] for s in reader([{"url": urls[1]}, {"url": urls[0]}, {"url": urls[1]}])]
    assert rested == [urls[0], urls[0]] and reader.tally is not None and reader.tally.failed == 1  # not re-tried

    def sources() -> Iterator[dict[str, str]]:
        yield {"url": urls[1]}  # 404: rested
        upload("late/s-1.tar", good)  # the uploader catches up
        yield {"url": urls[1]}  # rest over (0 s here): read

    monkeypatch.setattr(data, "MISSING_RETRY_S", 0.0)
    assert [s["__url__"] for s in reader(sources())] == [urls[1], urls[1]]


def test_nothing_readable_is_a_config_error_naming_the_key(upload: Upload, demo_cache: Path) -> None:
    url = f"gs://{BUCKET}/nothing/x-{{0..3}}.tar"
    shards = resolve_shards(url, "data.train", str(demo_cache))
    with pytest.raises(ConfigError, match=r"^data\.train: no shard of gs://test-bucket/nothing/x-\{0\.\.3\}\.tar "
                                          r"could be read: .*404"):
        check_location(url, shards, "data.train")
    # At run time too (the objects vanished after the check), through a loader worker process.
    tally = ShardTally()
    batches = train_batches(shards, image_size=8, batch_size=2, workers=1, location=url, tally=tally)
    with pytest.raises(ConfigError) as caught:
        next(batches)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"data.train: no shard of {url} could be read: all 4 are missing")
    assert tally.failed == 4


def test_gs_batches_through_a_worker(upload: Upload, tmp_path: Path) -> None:
    make_shard(tmp_path / "a.tar", [1, 2, 3])
    url = upload("w/a.tar", (tmp_path / "a.tar").read_bytes())
    tally = ShardTally()
    batches = train_batches([url, f"gs://{BUCKET}/w/missing.tar"], image_size=8, batch_size=4, workers=1, tally=tally)
    seen: set[int] = set()
    for _ in range(5):
        _, labels = next(batches)
        seen.update(int(x) for x in labels)
    assert seen == {1, 2, 3}
    assert tally.failed == 1  # counted in the worker, seen here; the 404 is not retried


def test_generation_is_pinned_while_a_shard_is_read(upload: Upload, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "GCS_CHUNK_BYTES", 1000)
    url = upload("gen/obj", b"a" * 5000)
    with contextlib.closing(open_location(url)) as stream:
        first = stream.read(1000)
        upload("gen/obj", b"b" * 5000)  # replaced mid-read
        try:
            rest = stream.read()
        except Exception as exc:  # the old generation is gone: the shard fails, it is not mixed
            assert type(exc).__name__ == "NotFound", exc
        else:
            assert first + rest == b"a" * 5000


@pytest.fixture
def http_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A directory served over HTTP on loopback (which a host must allow: [host] allow_local_urls)."""
    monkeypatch.setattr(read_policy, "_policy", read_policy.ReadPolicy(allow_local_urls=True))
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # the base class's name
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_http_shards(http_dir: tuple[Path, str]) -> None:
    root, base = http_dir
    make_shard(root / "h-0.tar", [4, 5])
    make_shard(root / "h-2.tar", [6])
    url = f"{base}/h-{{0..2}}.tar"
    shards = resolve_shards(url, "data.train", str(root))
    check_location(url, shards, "data.train")
    assert raw_samples(shards) == raw_samples([str(root / "h-0.tar"), str(root / "h-2.tar")])
    tally = ShardTally()
    assert [s["cls"] for s in read_all(ShardReader(tally=tally), shards)] == [b"4", b"5", b"6"]
    assert tally.failed == 1  # h-1.tar: 404
    with pytest.raises(ConfigError, match=r"^data\.val: no shard of .*/none-\{0\.\.1\}\.tar could be read: .*404"):
        check_location(f"{base}/none-{{0..1}}.tar", resolve_shards(f"{base}/none-{{0..1}}.tar", "data.val", ""),
                       "data.val")


def test_string_labels_through_a_class_list(upload: Upload, tmp_path: Path) -> None:
    classes = ["n01440764", "n01443537", "n01484850"]
    classes_url = upload("meta/classes.json", json.dumps(classes).encode())
    assert load_classes(classes_url) == classes
    make_named_shard(tmp_path / "named.tar", ["n01484850", "n01440764"])
    make_named_shard(tmp_path / "stranger.tar", ["n09999999"])
    named = upload("named/s-0.tar", (tmp_path / "named.tar").read_bytes())
    stranger = upload("named/s-1.tar", (tmp_path / "stranger.tar").read_bytes())

    tally = ShardTally()
    samples = read_all(ShardReader(classes=classes, tally=tally), [named, stranger])
    assert [s["cls"] for s in samples] == [b"2", b"0"]
    assert tally.failed == 1  # a name not in the list
    check_shard(named, "data.train", classes)

    tally = ShardTally()
    assert read_all(ShardReader(tally=tally), [named]) == []  # names, but no class list
    assert tally.failed == 1
    with pytest.raises(ConfigError, match=r"data\.train: .*'n01484850' is a class name but data\.classes names no"):
        check_shard(named, "data.train")
    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    with pytest.raises(ConfigError, match=r"^data\.classes: .*bad\.json is not a JSON list"):
        load_classes(str(tmp_path / "bad.json"))
