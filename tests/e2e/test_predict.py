"""Predictions from a run's checkpoint: hmctl predict (a subprocess, hmctl stays light) and POST /v1/predict.

A real daemon, joined to a run and paused (seeded state: no trainer competes for the
two cores), with a real resnet18 checkpoint written by the trainer's own
``save_checkpoint`` in the trainer's payload format.
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from hivemindd.host.observer import MAX_PREDICT_WAITING, Observer
from hivemindd.host.statedir import StatePaths, write_atomic
from hivemindd.tools.predict import MAX_IMAGE_PIXELS, describe_class
from hivemindd.tools.predict import main as predict_main
from hivemindd.trainer.checkpoint import BEST, keep_as, save_checkpoint
from hivemindd.trainer.model import build_model
from hivemindd.wire.protocol import RequestError
from hivemindd.wire.spec import parse_toml
from tests.support.daemons import DaemonProcess, daemon_at, seed_paused_run
from tests.support.dirs import short_dir
from tests.support.repo import REPO
from tests.support.specs import spec_toml

CLASSES = [f"n0000000{i} shape number {i}" for i in range(9)] + ["plain-name"]


def write_checkpoint(folder: Path, arch: str = "resnet18", num_classes: int = 10, step: int = 7) -> None:
    torch.manual_seed(0)
    model = build_model(arch, num_classes, 32)
    save_checkpoint(folder, {"model": model.state_dict(), "optimizer": {}, "step": step, "samples": step * 16,
                             "epoch": 1, "best_top1": 0.5, "finished": False, "rng": None})


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with short_dir("hmpr") as root:
        (root / "classes.json").write_text(json.dumps(CLASSES))
        paths = seed_paused_run(root / "a", spec_toml({"data": {"classes": str(root / "classes.json")}}))
        write_checkpoint(paths.run_dir("pz") / "checkpoints")
        keep_as(paths.run_dir("pz") / "checkpoints", BEST)
        with daemon_at(paths.root) as d:
            yield d


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


# --- issue 11 items 11 and 12: no code from checkpoints, bounded images and queue -------------------

class _Planted:
    """Unpickling this runs code: it touches ``marker`` (a stand-in for any command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        return (Path.touch, (self.marker,))


def run_dir_with_spec(tmp_path: Path) -> Path:
    run_dir = tmp_path / "state" / "runs" / "r"
    write_atomic(run_dir / "spec.json", parse_toml(spec_toml()).to_json().encode())
    return run_dir


def test_a_checkpoint_carrying_a_pickled_payload_runs_nothing(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = run_dir_with_spec(tmp_path)
    marker = tmp_path / "payload-ran"
    model = build_model("resnet18", 10, 32)
    torch.save({"model": model.state_dict(), "step": 1, "note": _Planted(marker)}, tmp_path / "planted.pt")
    code = predict_main([str(png(tmp_path / "x.png") and tmp_path / "x.png"), "--run-dir", str(run_dir),
                         "--checkpoint", str(tmp_path / "planted.pt")])
    assert code == 2
    assert not marker.exists(), "unpickling the checkpoint ran its payload"
    assert "holds more than weights" in capsys.readouterr().err


def png_header(width: int, height: int) -> bytes:
    """A small PNG whose header declares ``width`` x ``height`` (PIL refuses or accepts it by the header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + chunk(b"IEND", b""))


def test_oversized_images_are_unreadable_not_a_crash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = run_dir_with_spec(tmp_path)
    write_checkpoint(run_dir / "checkpoints")
    (tmp_path / "bomb.png").write_bytes(png_header(50_000, 50_000))  # 300 KB once compressed in the report
    # 49 MP: decodable (PIL's own limit is 89 MP), but ~0.15 GB a copy; refused from its header.
    Image.new("L", (7000, 7000)).save(tmp_path / "large.png")
    png(tmp_path / "small.png")
    code = predict_main([str(tmp_path / "bomb.png"), str(tmp_path / "large.png"), str(tmp_path / "small.png"),
                         "--run-dir", str(run_dir), "--checkpoint", "latest"])
    assert code == 0
    bomb, large, small = json.loads(capsys.readouterr().out)["results"]
    assert "not a readable image" in bomb["error"] and "exceeds limit" in bomb["error"]
    assert large["error"] == f"not a readable image: 7000x7000 pixels is too large (at most {MAX_IMAGE_PIXELS:,} pixels)"
    assert "top" in small


def test_post_predict_of_a_decompression_bomb_is_a_400(daemon: DaemonProcess) -> None:
    got, body = daemon.client.exchange("POST", "/v1/predict", png_header(50_000, 50_000))
    assert got == 400, body
    assert "exceeds limit" in json.loads(body)["error"]["message"]


def test_queued_uploads_are_bounded(tmp_path: Path) -> None:
    paths = StatePaths(tmp_path)
    observer = Observer(paths, "h", lambda: "QmA", lambda: ("r", {}), None, None)  # type: ignore[arg-type]

    async def scenario() -> None:
        release = asyncio.Event()
        started: list[bytes] = []

        async def slow_predict(run_id: str, image: Path, checkpoint: str, top: int) -> dict[str, Any]:
            started.append(image.read_bytes())
            await release.wait()
            return {"results": [{"image": "upload"}]}

        observer._run_predict = slow_predict  # type: ignore[method-assign]
        queued = [asyncio.create_task(observer.predict(b"image %d" % i, "best", 1))
                  for i in range(MAX_PREDICT_WAITING)]
        async with asyncio.timeout(30):
            while observer._predict_waiting < MAX_PREDICT_WAITING or not started:
                await asyncio.sleep(0.01)
        with pytest.raises(RequestError) as refused:
            async with asyncio.timeout(30):  # before the fix it queued: waiting on a release that never comes
                await observer.predict(b"one too many", "best", 1)
        assert refused.value.status == 503 and "busy" in refused.value.message
        release.set()
        await asyncio.gather(*queued)
        assert observer._predict_waiting == 0
        assert (await observer.predict(b"later", "best", 1))["results"][0]["image"] == "upload"

    asyncio.run(scenario())


def test_predict_does_not_read_the_state_dir_for_a_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 11 item 6: the class list a spec names is read under the run's read policy, in predict too."""
    state = tmp_path / "state"
    run_dir = state / "runs" / "r"
    (state / "identity.key").parent.mkdir(parents=True, exist_ok=True)
    (state / "identity.key").write_text('["a secret"]')
    (tmp_path / "classes.json").symlink_to(state / "identity.key")
    spec = spec_toml({"data": {"classes": str(tmp_path / "classes.json")}})
    write_atomic(run_dir / "spec.json", parse_toml(spec).to_json().encode())
    write_checkpoint(run_dir / "checkpoints")
    code = predict_main([str(png(tmp_path / "x.png") and tmp_path / "x.png"), "--run-dir", str(run_dir),
                         "--checkpoint", "latest"])
    err = capsys.readouterr().err
    assert code == 2 and "state directory" in err and "a secret" not in err


def test_every_torch_load_in_the_package_is_weights_only() -> None:
    """Issue 11 item 11: no checkpoint, pretrained file or upload is ever unpickled with code allowed."""
    import ast

    package = REPO / "hivemindd"
    calls = []
    for source in package.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                calls.append((f"{source.relative_to(package)}:{node.lineno}", keywords.get("weights_only")))
    assert calls and all(value == "True" for _, value in calls), calls


def test_the_demo_runs_classes_have_names(tmp_path: Path) -> None:
    """A run of examples/demo.toml (no [data] classes: the demo set names its own) predicts "red disc", not "#0"."""
    import subprocess
    import sys

    from hivemindd.trainer.demo_data import CLASS_NAMES

    spec = parse_toml((REPO / "hivemindd" / "examples" / "demo.toml").read_text())
    assert spec.data.classes == "" and spec.model.num_classes == len(CLASS_NAMES)
    run_dir = tmp_path / "runs" / "demo"
    write_atomic(run_dir / "spec.json", spec.to_json().encode())
    write_checkpoint(run_dir / "checkpoints", arch=spec.model.arch, num_classes=spec.model.num_classes)
    image = tmp_path / "red.png"
    png(image)
    done = subprocess.run([sys.executable, "-m", "hivemindd.tools.predict", "--run-dir", str(run_dir), "--checkpoint",
                           "latest", "--top", "10", str(image)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    top = json.loads(done.stdout)["results"][0]["top"]
    assert len(top) == 10
    for c in top:
        assert c["label"] == c["name"] == CLASS_NAMES[c["index"]]
    assert {c["label"] for c in top} == set(CLASS_NAMES)
    assert {"red disc", "blue cross", "green ring"} <= set(CLASS_NAMES)
