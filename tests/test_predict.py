"""Predictions from a run's checkpoint: hmctl predict (a subprocess, hmctl stays light) and POST /v1/predict.

A real daemon, joined to a run and paused (seeded state: no trainer competes for the
two cores), with a real resnet18 checkpoint written by the trainer's own
``save_checkpoint`` in the trainer's payload format.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from hivemindd.launch import HostSettings
from hivemindd.predict import describe_class
from hivemindd.spec import parse_toml
from hivemindd.state import DesiredState, StatePaths, save_state, write_atomic
from hivemindd.trainer.checkpoint import BEST, keep_as, save_checkpoint
from hivemindd.trainer.model import build_model
from tests.e2e.conftest import TEST_SPEC, DaemonProcess

CLASSES = [f"n0000000{i} shape number {i}" for i in range(9)] + ["plain-name"]


def write_checkpoint(folder: Path, arch: str = "resnet18", num_classes: int = 10, step: int = 7) -> None:
    torch.manual_seed(0)
    model = build_model(arch, num_classes, 32)
    save_checkpoint(folder, {"model": model.state_dict(), "optimizer": {}, "step": step, "samples": step * 16,
                             "epoch": 1, "best_top1": 0.5, "finished": False, "rng": None})


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    root = Path(tempfile.mkdtemp(prefix="hmpr", dir="/tmp"))
    (root / "discovery").mkdir()
    (root / "classes.json").write_text(json.dumps(CLASSES))
    paths = StatePaths(root / "a")
    paths.root.mkdir(mode=0o700)
    spec = TEST_SPEC.replace('image_size = 32', f'image_size = 32\nclasses = "{root / "classes.json"}"')
    write_atomic(paths.run_spec("pz"), parse_toml(spec).to_json().encode())
    write_checkpoint(paths.run_dir("pz") / "checkpoints")
    keep_as(paths.run_dir("pz") / "checkpoints", BEST)
    save_state(paths.state_file, DesiredState().joined("pz", HostSettings(device="cpu", batch_size=16))
               .with_paused(True, time.time() + 3600))
    d = DaemonProcess(paths.root, root / "discovery")
    try:
        d.start()
        yield d
    finally:
        d.reap()
        shutil.rmtree(root, ignore_errors=True)


def png(path: Path | None = None, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), colour).save(buffer, format="PNG")
    if path is not None:
        path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def test_describe_class_splits_synset_and_label() -> None:
    assert describe_class("n01440764 tench, Tinca tinca") == {"name": "n01440764 tench, Tinca tinca",
                                                              "synset": "n01440764", "label": "tench, Tinca tinca"}
    assert describe_class("n01440764: tench")["label"] == "tench"
    assert describe_class("n01440764") == {"name": "n01440764", "synset": "n01440764", "label": None}
    assert describe_class("cat") == {"name": "cat", "synset": None, "label": "cat"}


def test_hmctl_predict_prints_top_classes_with_names(daemon: DaemonProcess, tmp_path: Path) -> None:
    images = [tmp_path / "red.png", tmp_path / "blue.png"]
    png(images[0])
    png(images[1], (20, 40, 220))
    shown = daemon.hmctl("predict", *map(str, images), "--top", "3")
    assert shown.returncode == 0, shown.stderr
    assert "best.pt (step 7, resnet18)" in shown.stdout and "red.png:" in shown.stdout and "blue.png:" in shown.stdout
    assert "shape number" in shown.stdout or "plain-name" in shown.stdout
    result = json.loads(daemon.hmctl("predict", str(images[0]), "--json", "--checkpoint", "latest").stdout)
    assert result["checkpoint"].endswith("latest.pt") and result["step"] == 7
    top = result["results"][0]["top"]
    assert len(top) == 5
    probabilities = [c["probability"] for c in top]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1.0001
    for c in top:
        assert c["name"] == CLASSES[c["index"]]
        assert c["synset"] == (None if c["index"] == 9 else f"n0000000{c['index']}")


def test_post_predict_classifies_an_upload(daemon: DaemonProcess) -> None:
    status, body = daemon.client.exchange("POST", "/v1/predict?top=2", png())
    assert status == 200, body
    result = json.loads(body)
    assert result["results"][0]["image"] == "upload" and len(result["results"][0]["top"]) == 2


@pytest.mark.parametrize("query, payload, status, words", [
    ("", b"not an image at all", 400, "not a readable image"),
    ("?checkpoint=final", None, 409, "final.pt does not exist yet"),
    ("?top=0", None, 400, "top must be >= 1"),
    ("?checkpoint=../x", None, 400, "checkpoint must be one of best, latest, final"),
    ("", b"", 400, "the request body must be the image"),
])
def test_post_predict_errors_name_the_problem(daemon: DaemonProcess, query: str, payload: bytes | None, status: int,
                                              words: str) -> None:
    got, body = daemon.client.exchange("POST", "/v1/predict" + query, png() if payload is None else payload)
    assert got == status, body
    assert words in json.loads(body)["error"]["message"]


def test_an_oversized_upload_is_refused(daemon: DaemonProcess) -> None:
    got, body = daemon.client.exchange("POST", "/v1/predict", b"\0" * ((8 << 20) + 1))
    assert got == 413 and "8 MiB" in json.loads(body)["error"]["message"]


def test_a_checkpoint_of_another_model_is_refused_and_kept(daemon: DaemonProcess, tmp_path: Path) -> None:
    other = tmp_path / "other"
    write_checkpoint(other, arch="resnet18", num_classes=3)
    before = (other / "latest.pt").read_bytes()
    shown = daemon.hmctl("predict", str(png(tmp_path / "x.png") and tmp_path / "x.png"),
                         "--checkpoint", str(other / "latest.pt"))
    assert shown.returncode == 1
    assert "does not fit resnet18 with 10 classes" in shown.stderr and str(other / "latest.pt") in shown.stderr
    assert (other / "latest.pt").read_bytes() == before
    missing = daemon.hmctl("predict", str(tmp_path / "x.png"), "--checkpoint", str(tmp_path / "nope.pt"))
    assert missing.returncode == 1 and "nope.pt: no such file" in missing.stderr
