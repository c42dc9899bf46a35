"""hmctl dataset pack: real image files in, real tar shards out, read back and checked sample by sample."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from hivemindd.cli import main


def _image(path: Path, seed: int, fmt: str) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path.read_bytes()


def _pack(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(main, ["dataset", "pack", *args, "--json"])
    assert result.exit_code == 0, result.output
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def _read_shards(dest: Path, prefix: str) -> dict[str, tuple[str, bytes, int]]:
    """key → (extension, image bytes, cls), asserting no key appears twice across shards."""
    samples: dict[str, tuple[str, bytes, int]] = {}
    for shard in sorted(dest.glob(f"{prefix}-*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
        for name, data in members.items():
            key, ext = name.split(".", 1)
            if ext != "cls":
                assert key not in samples, f"{key} twice"
                samples[key] = (ext, data, int(members[f"{key}.cls"]))
    return samples


@pytest.fixture
def imagefolder(tmp_path: Path) -> tuple[Path, dict[str, tuple[str, bytes]]]:
    """SRC/<class>/<image>: 3 classes, PNG and JPEG mixed; returns key → (class, bytes)."""
    src = tmp_path / "imagenet-train"
    made = {}
    for c, cls in enumerate(["n02", "n01", "n03"]):
        for i in range(7):
            fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "JPEG")
            made[f"{cls}/{cls}_{i}"] = (cls, _image(src / cls / f"{cls}_{i}.{ext}", c * 100 + i, fmt))
    return src, made


def test_imagefolder_every_image_once_with_its_bytes_and_label(imagefolder: Any, tmp_path: Path) -> None:
    src, made = imagefolder
    dest = tmp_path / "out"
    summary = _pack(str(src), str(dest), "--shard-size", "4", "--seed", "7")
    assert summary["format"] == "imagefolder"
    assert (summary["shards"], summary["samples"], summary["classes"], summary["written"]) == (6, 21, 3, 6)
    classes = json.loads((dest / "classes.json").read_text())
    assert classes == ["n01", "n02", "n03"]
    packed = _read_shards(dest, "train")
    assert set(packed) == set(made)
    for key, (ext, data, label) in packed.items():
        cls, original = made[key]
        assert data == original  # stored as is, no re-encode
        assert ext == ("png" if original.startswith(b"\x89PNG") else "jpg")
        assert classes[label] == cls
    assert [len(_read_shards_one(p)) for p in sorted(dest.glob("train-*.tar"))] == [4, 4, 4, 4, 4, 1]
    # globally shuffled: the first shard is not one class's first files in order
    assert list(_read_shards_one(dest / "train-000000.tar")) != sorted(made)[:4]


def _read_shards_one(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return [m.name.split(".", 1)[0] for m in tar.getmembers() if not m.name.endswith(".cls")]


def test_resume_rewrites_only_missing_or_short_shards(imagefolder: Any, tmp_path: Path) -> None:
    src, _ = imagefolder
    dest = tmp_path / "out"
    _pack(str(src), str(dest), "--shard-size", "5")
    shards = sorted(dest.glob("train-*.tar"))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    shards[1].unlink()
    shards[3].write_bytes(shards[3].read_bytes()[:1000])  # as if cut short
    summary = _pack(str(src), str(dest), "--shard-size", "5")
    assert (summary["written"], summary["skipped"]) == (2, len(shards) - 2)
    for p in shards:
        mtime, data = before[p.name]
        assert p.read_bytes() == data  # shard i always holds the same samples, byte for byte
        assert (p.stat().st_mtime_ns == mtime) == (p not in (shards[1], shards[3]))
    assert not list(dest.glob(".*partial"))
    assert _pack(str(src), str(dest), "--shard-size", "5")["written"] == 0


def test_cifar10_batches_encoded_once_as_png(tmp_path: Path) -> None:
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    rng = np.random.default_rng(0)
    rows = {}
    for b in (1, 2):
        data = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
        labels = [(b * 3 + i) % 10 for i in range(6)]
        (src / f"data_batch_{b}").write_bytes(pickle.dumps({b"data": data, b"labels": labels}))
        rows.update({f"data_batch_{b}_{i:05d}": (data[i], labels[i]) for i in range(6)})
    (src / "test_batch").write_bytes(pickle.dumps({b"data": data[:2], b"labels": [0, 1]}))
    summary = _pack(str(tmp_path), str(tmp_path / "out"), "--shard-size", "5")
    assert (summary["format"], summary["samples"], summary["shards"], summary["classes"]) == ("cifar10", 12, 3, 10)
    classes = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert classes == sorted(classes) and classes[0] == "airplane"
    packed = _read_shards(tmp_path / "out", "train")
    assert set(packed) == set(rows)
    for key, (ext, png, label) in packed.items():
        row, original_label = rows[key]
        assert ext == "png" and label == original_label
        decoded = np.asarray(Image.open(io.BytesIO(png)))
        assert np.array_equal(decoded, row.reshape(3, 32, 32).transpose(1, 2, 0))
    test = _pack(str(src), str(tmp_path / "out"), "--split", "test", "--shard-size", "5")
    assert test["samples"] == 2 and (tmp_path / "out" / "test-000000.tar").is_file()


def _tiny_imagenet(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    wnids = ["n0002", "n0001"]
    (root / "wnids.txt").parent.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    train, val = {}, {}
    for c, wnid in enumerate(wnids):
        for i in range(3):
            _image(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", c * 10 + i, "JPEG")
            train[f"train/{wnid}/images/{wnid}_{i}"] = wnid
    lines = []
    for i in range(4):
        _image(root / "val" / "images" / f"val_{i}.JPEG", 50 + i, "JPEG")
        val[f"val/images/val_{i}"] = wnids[i % 2]
        lines.append(f"val_{i}.JPEG\t{wnids[i % 2]}\t0\t0\t8\t8")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return train, val


def test_tiny_imagenet_train_and_val(tmp_path: Path) -> None:
    src = tmp_path / "tiny-imagenet-200"
    train, val = _tiny_imagenet(src)
    dest = tmp_path / "out"
    assert _pack(str(src), str(dest), "--shard-size", "4")["format"] == "tiny-imagenet"
    _pack(str(src), str(dest), "--split", "val", "--shard-size", "4")
    classes = json.loads((dest / "classes.json").read_text())
    assert classes == ["n0001", "n0002"]
    for prefix, expected in (("train", train), ("val", val)):
        packed = _read_shards(dest, prefix)
        assert {k: classes[label] for k, (_, _, label) in packed.items()} == expected


def test_imagenet_val_with_labels_file(tmp_path: Path) -> None:
    src = tmp_path / "val"
    names = {f"ILSVRC2012_val_{i:08d}.JPEG": ["n01", "n02"][i % 2] for i in range(1, 6)}
    for i, name in enumerate(names):
        _image(src / name, i, "JPEG")
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{n} {c}\n" for n, c in names.items()))
    summary = _pack(str(src), str(tmp_path / "out"), "--labels", str(labels))
    assert (summary["format"], summary["split"], summary["samples"]) == ("imagenet-val", "val", 5)
    packed = _read_shards(tmp_path / "out", "val")
    assert {k: ["n01", "n02"][label] for k, (_, _, label) in packed.items()} == {
        n.removesuffix(".JPEG"): c for n, c in names.items()}
    # indices need the class list they index into
    labels.write_text("".join(f"{n} {i % 2}\n" for i, n in enumerate(names, 1)))
    classes = tmp_path / "out" / "classes.json"
    assert _pack(str(src), str(tmp_path / "out2"), "--labels", str(labels), "--classes", str(classes))["classes"] == 2


def test_gcs_destination_uploads_and_resumes(imagefolder: Any, gcs: Any, tmp_path: Path) -> None:
    from google.cloud import storage

    src, made = imagefolder
    summary = _pack(str(src), "gs://test-bucket/packs/in1k", "--shard-size", "8")
    assert (summary["shards"], summary["written"]) == (3, 3)
    bucket = storage.Client().bucket("test-bucket")
    names = sorted(b.name for b in bucket.list_blobs(prefix="packs/in1k/"))
    assert names == ["packs/in1k/classes.json"] + [f"packs/in1k/train-00000{i}.tar" for i in range(3)] + [
        "packs/in1k/train.manifest.json"]
    local = tmp_path / "fetched"
    local.mkdir()
    for name in names:
        bucket.blob(name).download_to_filename(str(local / Path(name).name))
    assert {k: d for k, (_, d, _) in _read_shards(local, "train").items()} == {k: d for k, (_, d) in made.items()}
    bucket.blob("packs/in1k/train-000001.tar").delete()
    again = _pack(str(src), "gs://test-bucket/packs/in1k", "--shard-size", "8")
    assert (again["written"], again["skipped"]) == (1, 2)


@pytest.mark.parametrize(("setup", "args", "code", "message"), [
    ("none", [], 2, "does not exist"),
    ("empty_dir", [], 1, "unknown dataset layout"),
    ("empty_class", [], 1, "hold no images"),
    ("unlabelled", ["--labels", "LABELS"], 1, "images have no label"),
    ("missing", ["--labels", "LABELS"], 1, "not in the folder"),
    ("unknown_class", ["--labels", "LABELS", "--classes", "CLASSES"], 1, "unknown class"),
    ("bad_split", ["--split", "val"], 2, "does not apply to cifar10"),
])
def test_clear_errors(tmp_path: Path, setup: str, args: list[str], code: int, message: str) -> None:
    src = tmp_path / "src"
    labels, classes = tmp_path / "labels.txt", tmp_path / "classes.json"
    if setup != "none":
        src.mkdir()
    if setup == "empty_class":
        _image(src / "cat" / "a.png", 0, "PNG")
        (src / "dog").mkdir()
    if setup in ("unlabelled", "missing", "unknown_class"):
        _image(src / "a.JPEG", 0, "JPEG")
        _image(src / "b.JPEG", 1, "JPEG")
        lines = {"unlabelled": "a.JPEG cat\n", "missing": "a.JPEG cat\nb.JPEG dog\nc.JPEG dog\n",
                 "unknown_class": "a.JPEG cat\nb.JPEG wolf\n"}[setup]
        labels.write_text(lines)
        classes.write_text('["cat", "dog"]')
    if setup == "bad_split":
        (src / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}))
    args = [str(labels) if a == "LABELS" else str(classes) if a == "CLASSES" else a for a in args]
    result = CliRunner().invoke(main, ["dataset", "pack", str(src), str(tmp_path / "out"), *args])
    assert result.exit_code == code, result.output
    assert message in result.output


# ---- one DEST, several packs: never overwrite another pack's shards (issue 10, item 2) ----

def _folders(root: Path, splits: dict[str, int], classes: tuple[str, ...] = ("cat", "dog")) -> None:
    """root/<split>/<class>/<image>.png: real small PNGs, different pixels in every split."""
    for s, (split, per_class) in enumerate(splits.items()):
        for c, cls in enumerate(classes):
            for i in range(per_class):
                _image(root / split / cls / f"{split}_{cls}_{i}.png", 1000 * s + 100 * c + i, "PNG")


def _snapshot(dest: Path, pattern: str = "*") -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(dest.glob(pattern)) if p.is_file()}


def _pack_fails(*args: str) -> str:
    result = CliRunner().invoke(main, ["dataset", "pack", *args])
    assert result.exit_code == 1, result.output
    return " ".join(result.output.split())  # the message as one line, whatever the terminal wrapped


def test_val_after_train_into_the_same_dest_leaves_the_train_shards_alone(tmp_path: Path) -> None:
    """The issue's report: `pack myimages/val packed` after `pack myimages/train packed` rewrote train-000000.tar."""
    _folders(tmp_path / "myimages", {"train": 6, "val": 2})
    dest = tmp_path / "packed"
    train = _pack(str(tmp_path / "myimages" / "train"), str(dest), "--shard-size", "5")
    assert (train["split"], train["prefix"], train["shards"]) == ("train", "train", 3)
    before = _snapshot(dest, "train-*.tar")
    val = _pack(str(tmp_path / "myimages" / "val"), str(dest), "--shard-size", "5")
    assert (val["split"], val["prefix"], val["shards"], val["written"]) == ("val", "val", 1, 1)
    assert _snapshot(dest, "train-*.tar") == before  # byte-identical and untouched
    assert set(_read_shards(dest, "val")) == {f"{c}/val_{c}_{i}" for c in ("cat", "dog") for i in range(2)}
    assert set(_read_shards(dest, "train")) == {f"{c}/train_{c}_{i}" for c in ("cat", "dog") for i in range(6)}
    manifests = {p.name: json.loads(p.read_text()) for p in dest.glob("*.manifest.json")}
    assert set(manifests) == {"train.manifest.json", "val.manifest.json"}
    val_manifest = manifests["val.manifest.json"]
    assert val_manifest["source"] == str((tmp_path / "myimages" / "val").resolve())
    assert (val_manifest["format"], val_manifest["split"], val_manifest["seed"], val_manifest["shard_size"]) == (
        "imagefolder", "val", 0, 5)
    assert (val_manifest["shards"], val_manifest["complete"]) == (["val-000000.tar"], True)


@pytest.mark.parametrize(("second", "differs"), [
    (["val", "--prefix", "train"], "source"),
    (["train", "--seed", "1"], "seed"),
    (["train", "--shard-size", "4"], "shard size"),
])
def test_a_different_pack_into_the_same_prefix_is_refused(tmp_path: Path, second: list[str], differs: str) -> None:
    _folders(tmp_path / "myimages", {"train": 6, "val": 2})
    dest = tmp_path / "packed"
    _pack(str(tmp_path / "myimages" / "train"), str(dest), "--shard-size", "5")
    before = _snapshot(dest)
    message = _pack_fails(str(tmp_path / "myimages" / second[0]), str(dest), "--shard-size", "5", *second[1:])
    assert _snapshot(dest) == before  # nothing written, not even classes.json or the manifest
    assert f"{dest / 'train.manifest.json'}" in message
    assert f"differs in {differs}" in message
    assert "another DEST or --prefix" in message and "delete" in message
    assert not list(dest.glob(".*partial"))


def test_shards_without_a_manifest_are_adopted_only_when_they_hold_this_packs_samples(tmp_path: Path) -> None:
    """Shards from before manifests existed: the same pack resumes over them, another is refused."""
    _folders(tmp_path / "myimages", {"train": 6, "val": 2})
    dest = tmp_path / "packed"
    _pack(str(tmp_path / "myimages" / "train"), str(dest), "--shard-size", "5")
    (dest / "train.manifest.json").unlink()
    before = _snapshot(dest, "train-*.tar")
    message = _pack_fails(str(tmp_path / "myimages" / "val"), str(dest), "--prefix", "train", "--shard-size", "5")
    assert "train-000000.tar" in message and "no train.manifest.json" in message
    assert _snapshot(dest, "train-*.tar") == before and not (dest / "train.manifest.json").exists()
    (dest / "train-000002.tar").unlink()
    again = _pack(str(tmp_path / "myimages" / "train"), str(dest), "--shard-size", "5")
    assert (again["written"], again["skipped"]) == (1, 2)
    assert _snapshot(dest, "train-*.tar") == before | {"train-000002.tar": _snapshot(dest)["train-000002.tar"]}
    assert (dest / "train-000002.tar").read_bytes() == before["train-000002.tar"][1]
    assert json.loads((dest / "train.manifest.json").read_text())["complete"] is True


def test_an_interrupted_pack_resumes_from_its_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hivemindd.tools.dataset_pack import shards

    _folders(tmp_path / "myimages", {"train": 6})
    src, dest = tmp_path / "myimages" / "train", tmp_path / "packed"
    real, calls = shards.write_shard, []

    def dies_on_the_third(path: Path, shard: Any, source: Any) -> None:
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if ^C while the third shard is written
        real(path, shard, source)

    monkeypatch.setattr(shards, "write_shard", dies_on_the_third)
    interrupted = CliRunner().invoke(main, ["dataset", "pack", str(src), str(dest), "--shard-size", "2"])
    assert interrupted.exit_code != 0
    manifest = json.loads((dest / "train.manifest.json").read_text())
    assert manifest["complete"] is False and len(manifest["shards"]) == 6
    assert sorted(p.name for p in dest.glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]
    done = _snapshot(dest, "train-*.tar")
    monkeypatch.setattr(shards, "write_shard", real)
    resumed = _pack(str(src), str(dest), "--shard-size", "2")
    assert (resumed["written"], resumed["skipped"]) == (4, 2)
    assert {k: v for k, v in _snapshot(dest, "train-*.tar").items() if k in done} == done
    assert json.loads((dest / "train.manifest.json").read_text())["complete"] is True
    assert set(_read_shards(dest, "train")) == {f"{c}/train_{c}_{i}" for c in ("cat", "dog") for i in range(6)}


@pytest.mark.parametrize(("folder", "args", "split", "prefix"), [
    ("val", [], "val", "val"),
    ("imagenet-train", [], "train", "train"),
    ("ILSVRC2012_img_val", [], "val", "val"),
    ("validation", [], "val", "val"),
    ("test", [], "test", "test"),
    ("holiday photos", [], "train", "holiday-photos"),  # no split in the name: the folder's name, made shard-safe
    ("holiday photos", ["--split", "val"], "val", "val"),
    ("val", ["--prefix", "train"], "val", "train"),  # the seed bucket's layout: val shards named train-* (own folder)
])
def test_imagefolder_prefix_follows_the_source(tmp_path: Path, folder: str, args: list[str], split: str,
                                               prefix: str) -> None:
    _folders(tmp_path, {folder: 1})
    summary = _pack(str(tmp_path / folder), str(tmp_path / "out"), *args)
    assert (summary["split"], summary["prefix"]) == (split, prefix)
    assert [p.name for p in (tmp_path / "out").glob("*.tar")] == [f"{prefix}-000000.tar"]


def test_a_pack_with_other_classes_keeps_the_classes_json_it_would_contradict(tmp_path: Path) -> None:
    _folders(tmp_path / "a", {"train": 1}, classes=("cat", "dog"))
    _folders(tmp_path / "b", {"val": 1}, classes=("ant", "bee", "cat"))
    dest = tmp_path / "out"
    _pack(str(tmp_path / "a" / "train"), str(dest))
    before = _snapshot(dest)
    message = _pack_fails(str(tmp_path / "b" / "val"), str(dest))
    assert "classes.json" in message and "another DEST" in message
    assert _snapshot(dest) == before


@pytest.mark.parametrize("prefix", ["", "a/b", "x{0..2}", ".hidden"])
def test_a_prefix_that_is_not_a_plain_name_is_rejected(tmp_path: Path, prefix: str) -> None:
    _folders(tmp_path, {"train": 1})
    result = CliRunner().invoke(main, ["dataset", "pack", str(tmp_path / "train"), str(tmp_path / "out"),
                                       "--prefix", prefix])
    assert result.exit_code == 2 and "--prefix" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_help_documents_split_and_prefix() -> None:
    result = CliRunner().invoke(main, ["dataset", "pack", "--help"], terminal_width=200)
    text = " ".join(result.output.split())
    assert "--split" in text and "imagefolder" in text.lower() and "--prefix" in text
    assert "manifest" in text


def test_gcs_destination_refuses_another_pack_into_its_prefix(imagefolder: Any, gcs: Any, tmp_path: Path) -> None:
    from google.cloud import storage

    src, _ = imagefolder
    _pack(str(src), "gs://test-bucket/packs/guard", "--shard-size", "8")
    bucket = storage.Client().bucket("test-bucket")
    before = {b.name: b.md5_hash for b in bucket.list_blobs(prefix="packs/guard/")}
    assert "packs/guard/train.manifest.json" in before
    message = _pack_fails(str(src), "gs://test-bucket/packs/guard", "--shard-size", "8", "--seed", "3")
    assert "differs in seed" in message and "gs://test-bucket/packs/guard/train.manifest.json" in message
    assert {b.name: b.md5_hash for b in bucket.list_blobs(prefix="packs/guard/")} == before
    assert _pack(str(src), "gs://test-bucket/packs/guard", "--shard-size", "8")["written"] == 0
    # shards from before manifests: each one's first tar header (a ranged read) says whose it is
    bucket.blob("packs/guard/train.manifest.json").delete()
    message = _pack_fails(str(src), "gs://test-bucket/packs/guard", "--shard-size", "8", "--seed", "3")
    assert "gs://test-bucket/packs/guard/train-000000.tar" in message and "no train.manifest.json" in message
    assert _pack(str(src), "gs://test-bucket/packs/guard", "--shard-size", "8")["written"] == 0
    assert {b.name: b.md5_hash for b in bucket.list_blobs(prefix="packs/guard/")} == before
