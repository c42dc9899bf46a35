"""The prefetch thread, uint8 transforms with on-device normalisation, and the append-only metrics CSVs."""

from __future__ import annotations

import csv
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from hivemindd.trainer.metrics import TRAINING_COLUMNS, CsvLog, RateMeter, SystemStats
from hivemindd.trainer.transforms import IMAGENET_MEAN, IMAGENET_STD, DeviceNormalizer, Prefetcher, train_transform, val_transform
from tests.support.waiting import wait_until


def test_prefetcher_yields_everything_in_order_then_stops() -> None:
    with Prefetcher(iter(range(10)), depth=2) as items:
        assert list(items) == list(range(10))
        wait_until(lambda: not items.alive, 30, "the prefetch thread to end", interval=0.01)


def test_prefetcher_reraises_the_producers_error_after_the_items_before_it() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("shard exploded")

    items = Prefetcher(source())
    assert next(items) == 1 and next(items) == 2
    with pytest.raises(ValueError, match="shard exploded"):
        next(items)
    with pytest.raises(StopIteration):
        next(items)
    wait_until(lambda: not items.alive, 30, "the prefetch thread to end", interval=0.01)


def test_close_stops_a_producer_blocked_on_a_full_queue() -> None:
    produced = []

    def endless() -> Iterator[int]:
        n = 0
        while True:
            produced.append(n)
            yield n
            n += 1

    items = Prefetcher(endless(), depth=2)
    assert next(items) == 0
    wait_until(lambda: len(produced) >= 3, 30, "three items produced", interval=0.01)  # the queue is full; the thread waits to put
    items.close()
    assert not items.alive  # the thread is gone: nothing more is produced
    with pytest.raises(StopIteration):
        next(items)


def test_close_does_not_hang_on_a_producer_stuck_in_its_source() -> None:
    release = threading.Event()

    def stuck() -> Iterator[int]:
        release.wait()
        yield 1

    items = Prefetcher(stuck(), join_timeout_s=0.2)
    started = time.monotonic()
    items.close()
    assert time.monotonic() - started < 5
    release.set()
    # It notices the close once its source returns.
    wait_until(lambda: not items.alive, 30, "the prefetch thread to end after the close", interval=0.01)


def test_transforms_give_uint8_and_the_device_normalises() -> None:
    image = Image.new("L", (40, 30), color=128)  # grey: becomes RGB
    for transform in (train_transform(16), train_transform(16, "crop-flip"), train_transform(16, "none"),
                      val_transform(16)):
        out = transform(image)
        assert out.dtype == torch.uint8 and out.shape == (3, 16, 16)
    batch = torch.full((2, 3, 4, 4), 128, dtype=torch.uint8)
    normalised = DeviceNormalizer(torch.device("cpu"))(batch)
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert normalised.dtype == torch.float32
    assert torch.allclose(normalised[0, :, 0, 0], expected, atol=1e-5)
    assert DeviceNormalizer(torch.device("cpu"), channels_last=True)(batch).is_contiguous(
        memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"data\.augment"):
        train_transform(16, "mixup")


def test_csv_appends_after_a_restart_and_sets_aside_a_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "stats" / "training_metrics.csv"
    first = CsvLog(path, TRAINING_COLUMNS)
    first.row([1.0, 1, 0, 0.01, 2.3, 0.125, 0.1, 50.0])
    first.close()
    again = CsvLog(path, TRAINING_COLUMNS)
    again.row([2.0, 2, 0, 0.02, None, 0.25, 0.1, 51.0])
    again.close()
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == list(TRAINING_COLUMNS) and [line[1] for line in lines[1:]] == ["1", "2"]
    assert lines[2][4] == ""  # a missing value is an empty cell
    assert lines[1][0] == "1" and lines[1][4] == "2.3"
    stamp = CsvLog(tmp_path / "t.csv", ["timestamp"])
    stamp.row([1763750000.1234])
    stamp.close()
    assert (tmp_path / "t.csv").read_text().splitlines()[1] == "1763750000.123"  # not 1.76375e+09
    third = CsvLog(path, TRAINING_COLUMNS)
    with pytest.raises(ValueError, match="3 values for 8 columns"):
        third.row([1, 2, 3])
    third.close()

    path.write_text("old,columns\n1,2\n")
    CsvLog(path, TRAINING_COLUMNS).close()
    assert (tmp_path / "stats" / "training_metrics.csv.1").read_text() == "old,columns\n1,2\n"
    assert path.read_text().splitlines() == [",".join(TRAINING_COLUMNS)]


def test_rate_meter_and_system_stats(tmp_path: Path) -> None:
    meter = RateMeter(window_s=5)
    assert meter.add(10, now=0.0) == 0.0
    assert meter.add(10, now=1.0) == pytest.approx(10.0)
    assert meter.add(30, now=2.0) == pytest.approx(20.0)
    stats = SystemStats(tmp_path / "system_stats.csv", interval_s=0.05).start()
    wait_until(lambda: len((tmp_path / "system_stats.csv").read_text().splitlines()) >= 3, 30, "two rows of system stats",
               interval=0.01)
    stats.stop()
    with open(tmp_path / "system_stats.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert 0 <= float(rows[-1]["cpu_percent"]) <= 100 and float(rows[-1]["mem_used_gb"]) > 0
    assert rows[-1]["gpu_util_percent"] == "" and rows[-1]["gpu_mem_used_gb"] == ""
