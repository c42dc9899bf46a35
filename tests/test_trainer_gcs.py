"""The real trainer on gs:// shards (fake-gcs-server): it trains, and an empty location is exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from hivemindd.trainer.data import resolve_shards
from tests.gcs_emulator import GcsEmulator
from tests.test_trainer_process import Trainer, make_launch


@pytest.mark.timeout(120)
def test_trainer_reads_gs_shards(short_tmp: Path, demo_cache: Path, gcs: GcsEmulator, bootstrap: list[str],
                                 process_groups: list[int]) -> None:
    from google.cloud import storage

    client = storage.Client()
    bucket = client.bucket("test-bucket")
    local = resolve_shards("demo://shapes/train", "data.train", str(demo_cache))
    for path in local:
        bucket.blob(f"demo/{Path(path).name}").upload_from_filename(path)
    client.close()

    nowhere = "gs://test-bucket/nowhere/train-{00000..00003}.tar"
    failing = Trainer(make_launch(short_tmp, demo_cache, bootstrap, name="n", changes={"data": {"train": nowhere}}),
                      process_groups)
    assert failing.wait_exit() == 2
    [error] = failing.drain()
    assert error["type"] == "error"
    assert error["message"].startswith(f"data.train: no shard of {nowhere} could be read: ")
    assert "404" in error["message"]

    # One shard more than there are: the missing one is skipped and counted, never fatal.
    url = f"gs://test-bucket/demo/train-{{00000..{len(local):05d}}}.tar"
    trainer = Trainer(make_launch(short_tmp, demo_cache, bootstrap, changes={"data": {"train": url}}), process_groups)
    progress = trainer.wait_for(lambda e: e["type"] == "progress" and e["step"] >= 3)
    assert isinstance(progress["shards_failed"], int) and progress["shards_failed"] >= 0
    trainer.proc.terminate()
    assert trainer.wait_exit() == 0
