"""Validation, best/final checkpoints, metrics files, and checkpoints that go wrong, with real trainers.

One trainer runs a short run to its end ([run] max_epochs); another is stopped,
damaged and restarted: a corrupt latest.pt, then a disk that refuses the next
checkpoint (a file-size limit on the trainer process, which fails writes the way
a full disk does).
"""

from __future__ import annotations

import csv
import json
import resource
import signal
import subprocess
from pathlib import Path
from typing import Any

import hivemind
import pytest
import torch

from hivemindd.trainer.checkpoint import BEST, FINAL, LATEST, PREVIOUS
from hivemindd.trainer.metrics import SYSTEM_COLUMNS, TRAINING_COLUMNS, VALIDATION_COLUMNS, stats_dir
from tests.test_trainer_process import Trainer, make_launch

VALIDATED = {"data": {"val": "demo://shapes/val", "train_samples": 640},  # 10 global steps per dataset epoch
             "validation": {"every_steps": 4, "batches": 2}}



def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


def load(path: Path) -> dict[str, Any]:
    payload: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return payload


@pytest.mark.timeout(180)
def test_a_run_validates_keeps_the_best_and_finishes(short_tmp: Path, demo_cache: Path, bootstrap: list[str],
                                                      process_groups: list[int]) -> None:
    changes = {**VALIDATED, "run": {"max_epochs": 0.5}, "checkpoint": {"every_steps": 1000}}
    launch = make_launch(short_tmp, demo_cache, bootstrap, changes=changes)
    trainer = Trainer(launch, process_groups)
    finished = trainer.wait_type("finished", timeout=120)
    assert trainer.wait_exit() == 0
    events = trainer.drain()
    work = short_tmp / "w"
    assert finished["epoch"] == 5 and finished["dataset_epoch"] == pytest.approx(0.5)
    assert Path(finished["path"]) == work / "checkpoints" / FINAL and events[-1]["type"] == "stopped"

    validations = [e for e in events if e["type"] == "validation"]
    assert len(validations) >= 2
    for v in validations:
        assert 0 <= v["val_top1"] <= v["val_top5"] <= 1 and v["samples"] == 2 * 8  # two batches of 8
    improving = [v for v, before in zip(validations, [None, *validations], strict=False)
                 if before is None or v["val_top1"] > before["best_top1"]]
    assert [v["best_top1"] for v in validations] == [max(x["val_top1"] for x in validations[:i + 1])
                                                     for i in range(len(validations))]
    best = load(work / "checkpoints" / BEST)
    assert best["step"] == improving[-1]["step"] and best["best_top1"] == improving[-1]["val_top1"]
    final = load(work / "checkpoints" / FINAL)
    assert final["finished"] is True and final["epoch"] == 5 and final["step"] == finished["step"]

    stats = stats_dir(work)
    train_rows = rows(stats / "training_metrics.csv")
    assert header(stats / "training_metrics.csv") == list(TRAINING_COLUMNS)
    assert [int(r["step"]) for r in train_rows] == list(range(1, finished["step"] + 1))
    assert all(0 <= float(r["train_top1"]) <= 1 and float(r["lr"]) == pytest.approx(0.05) for r in train_rows)
    assert float(train_rows[-1]["dataset_epoch"]) == pytest.approx(0.5, abs=0.11)
    val_rows = rows(stats / "validation_metrics.csv")
    assert header(stats / "validation_metrics.csv") == list(VALIDATION_COLUMNS)
    assert [(int(r["step"]), float(r["val_top1"])) for r in val_rows] == [
        (v["step"], pytest.approx(v["val_top1"], abs=1e-5)) for v in validations]
    assert header(stats / "system_stats.csv") == list(SYSTEM_COLUMNS) and rows(stats / "system_stats.csv")
    parameters = json.loads((stats / "parameters.json").read_text())
    assert parameters["spec"]["run"]["max_epochs"] == 0.5 and parameters["host"]["batch_size"] == 8
    assert parameters["device"]["device"] == "cpu" and parameters["versions"]["hivemind"] == hivemind.__version__

    # A finished run stays finished: a restart says so at once and trains nothing.
    again = Trainer(launch, process_groups)
    assert again.wait_exit() == 0
    assert [e["type"] for e in again.drain()] == ["finished", "stopped"]
    assert len(rows(stats / "training_metrics.csv")) == len(train_rows)


class LimitedTrainer(Trainer):
    """A trainer whose files may not grow past ``max_bytes``: writes beyond fail with EFBIG, as on a full disk."""

    def __init__(self, launch: Path, groups: list[int], max_bytes: int) -> None:
        real_popen = subprocess.Popen

        def limited(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
            def limit() -> None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error from write(), not a killed process
                resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

            return real_popen(*args, preexec_fn=limit, **kwargs)

        subprocess.Popen = limited  # type: ignore[misc]
        try:
            super().__init__(launch, groups)
        finally:
            subprocess.Popen = real_popen  # type: ignore[misc]


@pytest.mark.timeout(240)
def test_corrupt_checkpoint_falls_back_and_full_disk_keeps_the_last_one(
        short_tmp: Path, demo_cache: Path, bootstrap: list[str], process_groups: list[int]) -> None:
    launch = make_launch(short_tmp, demo_cache, bootstrap, changes=VALIDATED)
    checkpoints, stats = short_tmp / "w" / "checkpoints", stats_dir(short_tmp / "w")
    trainer = Trainer(launch, process_groups)
    trainer.wait_for(lambda e: e["type"] == "checkpoint" and e["step"] >= 10)
    trainer.proc.send_signal(signal.SIGTERM)
    assert trainer.wait_exit() == 0
    stopped = trainer.drain()[-1]
    first_rows = rows(stats / "training_metrics.csv")
    assert int(first_rows[-1]["step"]) == stopped["step"]

    # Flip one byte inside a tensor: torch.load would read it without a word; the CRC catches it.
    previous_step = load(checkpoints / PREVIOUS)["step"]
    data = bytearray((checkpoints / LATEST).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (checkpoints / LATEST).write_bytes(bytes(data))
    again = Trainer(launch, process_groups)
    warning = again.wait_type("warning")
    assert warning["kind"] == "checkpoint_corrupt" and "latest.pt: unreadable" in warning["message"]
    assert "checksum" in warning["message"] and "resuming from previous.pt" in warning["message"]
    resumed = again.wait_type("resumed")
    assert resumed == {"type": "resumed", "source": "checkpoint", "step": previous_step, "epoch": resumed["epoch"]}
    again.wait_for(lambda e: e["type"] == "checkpoint" and e["step"] > previous_step + 5)
    again.proc.send_signal(signal.SIGTERM)
    assert again.wait_exit() == 0
    stopped = again.drain()[-1]
    # Restarts append to the metrics files: one header, the first run's rows first, then the new ones.
    more = rows(stats / "training_metrics.csv")
    assert more[:len(first_rows)] == first_rows and int(more[-1]["step"]) == stopped["step"]
    assert (stats / "training_metrics.csv").read_text().count("timestamp,") == 1

    # A disk that refuses checkpoints: warnings, training goes on, the last good checkpoint stays.
    good = (checkpoints / LATEST).read_bytes()
    assert len(good) > 1_000_000
    full = LimitedTrainer(launch, process_groups, max_bytes=1_000_000)
    failed = full.wait_type("warning")
    assert failed["kind"] == "checkpoint_failed" and "training goes on" in failed["message"]
    full.wait_for(lambda e: e["type"] == "progress" and e["step"] > failed_step(failed) + 3)
    assert (checkpoints / LATEST).read_bytes() == good
    assert not [p.name for p in checkpoints.iterdir() if p.name.endswith(".tmp")]
    full.proc.send_signal(signal.SIGTERM)
    assert full.wait_exit() == 0
    assert (checkpoints / LATEST).read_bytes() == good
    assert load(checkpoints / LATEST)["step"] == stopped["step"]


def failed_step(warning: dict[str, Any]) -> int:
    return int(warning["message"].split("checkpoint at step ", 1)[1].split(" ", 1)[0])
