"""Raw image folder trees (``<root>/<synset>/<file>.JPEG``) as training data: local and gs://."""

from __future__ import annotations

import gzip
import io
import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from hivemindd.trainer.data import ShardTally, check_location, resolve_shards, train_batches
from hivemindd.trainer.errors import ConfigError
from hivemindd.trainer.folder_tree import TreeReader, index_path, read_index

# Created out of order on purpose: the class index is the position in the *sorted* folder names.
SYNSETS = ("n03000134", "n01440764", "n02102040")
COLOURS = {"n01440764": (250, 0, 0), "n02102040": (0, 250, 0), "n03000134": (0, 0, 250)}
PER_CLASS = 4


def jpeg(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (12, 12), colour).save(out, format="JPEG", quality=95)
    return out.getvalue()


def make_tree(root: Path) -> None:
    for synset in SYNSETS:
        (root / synset).mkdir(parents=True)
        for i in range(PER_CLASS):
            (root / synset / f"{synset}_{i}.JPEG").write_bytes(jpeg(COLOURS[synset]))
    (root / "README.txt").write_text("not a class folder")
    (root / SYNSETS[0] / "notes.txt").write_text("not an image")


def dominant_class(sample: dict[str, bytes]) -> int:
    """Which class's colour the decoded image has, as an index into the sorted synsets."""
    rgb = Image.open(io.BytesIO(sample["jpeg"])).convert("RGB").getpixel((6, 6))
    assert isinstance(rgb, tuple)
    return sorted(SYNSETS).index(next(s for s, c in COLOURS.items() if c.index(max(c)) == rgb.index(max(rgb))))


def take(reader: TreeReader, n: int) -> list[dict[str, bytes]]:
    samples: Iterator[dict[str, bytes]] = reader()
    out = list(itertools.islice(samples, n))
    samples.close()  # type: ignore[attr-defined]
    return out


def test_local_tree_is_listed_once_labelled_by_sorted_folder_and_cached(tmp_path: Path) -> None:
    root, cache = tmp_path / "train", tmp_path / "cache"
    make_tree(root)
    url = f"{root}/"
    assert resolve_shards(url, "data.train", str(cache)) == [url]
    check_location(url, [url], "data.train")
    index = read_index(index_path(url, str(cache)))
    assert index.classes == sorted(SYNSETS)
    assert len(index.files) == len(SYNSETS) * PER_CLASS  # README.txt and notes.txt left out

    samples = take(TreeReader(url, str(index_path(url, str(cache)))), 40)
    assert {int(s["cls"]) for s in samples} == {0, 1, 2}
    for sample in samples:
        assert int(sample["cls"]) == dominant_class(sample)

    # A second start reads the cached index: a class folder added since is not seen (documented).
    (root / "n04000000").mkdir()
    (root / "n04000000" / "x.JPEG").write_bytes(jpeg((9, 9, 9)))
    resolve_shards(url, "data.train", str(cache))
    assert read_index(index_path(url, str(cache))).classes == sorted(SYNSETS)


def test_class_list_gives_the_indices_when_present(tmp_path: Path) -> None:
    root = tmp_path / "train"
    make_tree(root)
    url = f"{root}/"
    classes = ["n02102040", "n09999999", "n03000134", "n01440764"]
    resolve_shards(url, "data.train", str(tmp_path / "cache"), classes)
    samples = take(TreeReader(url, str(index_path(url, str(tmp_path / "cache"))), classes=classes), 30)
    by_colour = {int(s["cls"]) for s in samples if dominant_class(s) == sorted(SYNSETS).index("n02102040")}
    assert by_colour == {0}


def test_folders_missing_from_the_class_list_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "train"
    make_tree(root)
    with pytest.raises(ConfigError, match=r"data\.train: folders n02102040 .* not in the class list"):
        resolve_shards(f"{root}/", "data.train", str(tmp_path / "cache"), ["n01440764", "n03000134"])


@pytest.mark.parametrize(("layout", "message"), [
    ("missing", "is not a folder"),
    ("empty", "has no class folders"),
    ("no-images", "hold no images"),
])
def test_unusable_trees_are_config_errors_naming_the_key(tmp_path: Path, layout: str, message: str) -> None:
    root = tmp_path / "train"
    if layout != "missing":
        root.mkdir()
    if layout == "no-images":
        (root / "n01").mkdir()
        (root / "n01" / "a.txt").write_text("x")
    with pytest.raises(ConfigError, match=rf"data\.train: .*{message}"):
        resolve_shards(f"{root}/", "data.train", str(tmp_path / "cache"))
    assert not index_path(f"{root}/", str(tmp_path / "cache")).exists()


def test_a_corrupt_cached_index_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "train"
    make_tree(root)
    url = f"{root}/"
    path = index_path(url, str(tmp_path / "cache"))
    path.parent.mkdir(parents=True)
    path.write_bytes(gzip.compress(b"{not json"))
    with caplog.at_level(logging.WARNING):
        resolve_shards(url, "data.train", str(tmp_path / "cache"))
    assert "unreadable" in caplog.text
    assert len(read_index(path).files) == len(SYNSETS) * PER_CLASS


def test_a_vanished_file_is_skipped_and_counted(tmp_path: Path) -> None:
    root = tmp_path / "train"
    make_tree(root)
    url = f"{root}/"
    resolve_shards(url, "data.train", str(tmp_path / "cache"))
    gone = root / SYNSETS[1] / f"{SYNSETS[1]}_0.JPEG"
    gone.unlink()
    tally = ShardTally()
    samples = take(TreeReader(url, str(index_path(url, str(tmp_path / "cache"))), tally=tally), 200)
    assert len(samples) == 200
    assert tally.failed > 0
    assert all(s["__key__"] != f"{SYNSETS[1]}/{SYNSETS[1]}_0" for s in samples)


def test_train_batches_from_a_tree(tmp_path: Path) -> None:
    root = tmp_path / "train"
    make_tree(root)
    url = f"{root}/"
    shards = resolve_shards(url, "data.train", str(tmp_path / "cache"))
    batches = train_batches(shards, 8, 6, 0, location=url, cache_dir=str(tmp_path / "cache"))
    images, labels = next(batches)
    assert images.shape[0] == 6 and images.shape[-2:] == (8, 8)
    assert set(labels.tolist()) <= {0, 1, 2}


def test_gcs_tree_with_a_missing_object(gcs: object, tmp_path: Path) -> None:
    from google.cloud import storage

    client = storage.Client()
    bucket = client.bucket("test-bucket")
    for synset in SYNSETS:
        for i in range(PER_CLASS):
            bucket.blob(f"imagenet/train/{synset}/{synset}_{i}.JPEG").upload_from_string(jpeg(COLOURS[synset]))
    bucket.blob("imagenet/train/LOC_synset_mapping.txt").upload_from_string(b"not a folder")
    url = "gs://test-bucket/imagenet/train/"
    resolve_shards(url, "data.train", str(tmp_path / "cache"))
    index = read_index(index_path(url, str(tmp_path / "cache")))
    assert index.classes == sorted(SYNSETS) and len(index.files) == len(SYNSETS) * PER_CLASS
    bucket.blob(f"imagenet/train/{SYNSETS[0]}/{SYNSETS[0]}_1.JPEG").delete()
    tally = ShardTally()
    samples = take(TreeReader(url, str(index_path(url, str(tmp_path / "cache"))), tally=tally), 120)
    client.close()
    for sample in samples:
        assert int(sample["cls"]) == dominant_class(sample)
    assert tally.failed > 0


def test_gcs_tree_in_a_missing_bucket_is_a_config_error(gcs: object, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.train: cannot list gs://no-such-bucket/train/"):
        resolve_shards("gs://no-such-bucket/train/", "data.train", str(tmp_path / "cache"))
