"""``hmctl dataset pack``: turn an image dataset on disk into shuffled WebDataset tar shards.

Sources: an ImageFolder tree (SRC/<class>/<image>), CIFAR-10 python batches, Tiny-ImageNet-200,
and a flat ImageNet val folder with a labels file. Images are stored as their original bytes
(CIFAR's raw arrays are encoded once, as PNG). The global shuffle depends only on the sorted
sample keys and ``--seed``, so shard i always holds the same samples: a rerun skips the shards
that are already complete and rewrites the rest. Shards are byte-for-byte reproducible (fixed
tar metadata), which is what makes the local size check a completeness check.

That is only true of a rerun of the *same* pack, so ``<prefix>.manifest.json`` beside the shards
records which pack owns the prefix (source, format, split, seed, shard size, a fingerprint of the
samples), and any other pack into that prefix is refused before a byte is written. Shards from
before manifests are adopted only when each one starts with the sample this pack puts there.

Only stdlib and click at import time: hmctl imports this module on every call.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import os
import random
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp", ".gif": "gif",
              ".tif": "tiff", ".tiff": "tiff"}
FORMATS = ("auto", "imagefolder", "cifar10", "tiny-imagenet", "imagenet-val")
SPLITS = {"imagefolder": ("train", "val", "test"), "cifar10": ("train", "test"), "tiny-imagenet": ("train", "val"),
          "imagenet-val": ("val",)}
TAR_BLOCK, TAR_RECORD = 512, 512 * 20
# an ImageFolder's split, from a word in its folder's name (imagenet/val, ILSVRC2012_img_train, …)
SPLIT_WORDS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}
PREFIX_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # nothing a brace pattern or a path would split
MANIFEST_VERSION = 1
HEAD_BYTES = 64 * 1024  # enough for a shard's first tar header, even behind a pax header


@dataclass(frozen=True)
class Sample:
    """One image: its ``__key__``, label, webdataset extension, and where its bytes come from."""

    key: str
    cls: int
    ext: str
    ref: Path | int  # a file, or a row of the in-memory CIFAR arrays


@dataclass
class Source:
    """A dataset split, loaded as an index: class names, samples, and how to read one sample's bytes."""

    fmt: str
    split: str
    classes: list[str]
    samples: list[Sample]
    read: Callable[[Sample], bytes]
    size: Callable[[Sample], int]


def _file_bytes(sample: Sample) -> bytes:
    return Path(sample.ref).read_bytes()  # type: ignore[arg-type]


def _file_size(sample: Sample) -> int:
    return Path(sample.ref).stat().st_size  # type: ignore[arg-type]


def _file_source(fmt: str, split: str, classes: list[str], samples: list[Sample]) -> Source:
    return Source(fmt, split, classes, samples, _file_bytes, _file_size)


def _key(rel: Path) -> str:
    # webdataset splits a member name at the first dot of its last component, so keys carry none
    return rel.with_suffix("").as_posix().replace(".", "_")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".") and path.is_file()


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if _is_image(p))


def load_imagefolder(src: Path, split: str) -> Source:
    class_dirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise click.ClickException(f"{src}: no class folders (expected SRC/<class>/<image>)")
    samples, empty = [], []
    for label, folder in enumerate(class_dirs):
        images = _images_under(folder)
        if not images:
            empty.append(folder.name)
        samples += [Sample(_key(p.relative_to(src)), label, IMAGE_EXTS[p.suffix.lower()], p) for p in images]
    if empty:
        raise click.ClickException(f"{src}: {len(empty)} class folder(s) hold no images "
                                   f"({', '.join(empty[:5])}{', …' if len(empty) > 5 else ''}); "
                                   f"remove them or add images ({', '.join(sorted(set(IMAGE_EXTS)))})")
    return _file_source("imagefolder", split, [p.name for p in class_dirs], samples)


def _cifar_dir(src: Path) -> Path:
    nested = src / "cifar-10-batches-py"
    return nested if nested.is_dir() else src


def load_cifar10(src: Path, split: str) -> Source:
    import pickle

    import numpy as np

    src = _cifar_dir(src)
    names = sorted(p.name for p in src.glob("data_batch_*")) if split == "train" else ["test_batch"]
    names = [n for n in names if (src / n).is_file()]
    if not names:
        raise click.ClickException(f"{src}: no CIFAR-10 {split} batches (data_batch_1..5 or test_batch)")
    meta = src / "batches.meta"
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    if meta.is_file():
        with meta.open("rb") as f:  # CIFAR ships as pickles; only unpack datasets you trust
            classes = [n.decode() for n in pickle.load(f, encoding="bytes")[b"label_names"]]
    arrays: list[Any] = []
    samples: list[Sample] = []
    base = 0
    for name in names:
        with (src / name).open("rb") as f:
            batch = pickle.load(f, encoding="bytes")
        try:
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = [int(x) for x in batch[b"labels"]]
        except (KeyError, ValueError, TypeError) as exc:
            raise click.ClickException(f"{src / name}: not a CIFAR-10 batch ({exc})") from None
        if len(labels) != len(data) or any(not 0 <= x < len(classes) for x in labels):
            raise click.ClickException(f"{src / name}: {len(data)} images but {len(labels)} labels, "
                                       f"or a label outside 0..{len(classes) - 1}")
        samples += [Sample(f"{name}_{i:05d}", label, "png", base + i) for i, label in enumerate(labels)]
        arrays.append(data)
        base += len(data)
    pixels = np.concatenate(arrays).transpose(0, 2, 3, 1)  # NCHW rows → HWC images

    def encode(sample: Sample) -> bytes:
        from PIL import Image

        assert isinstance(sample.ref, int)
        out = io.BytesIO()
        Image.fromarray(pixels[sample.ref]).save(out, format="PNG")
        return out.getvalue()

    # sorted class names are the label order; CIFAR's own list is already sorted
    order = sorted(range(len(classes)), key=lambda i: classes[i])
    if order != list(range(len(classes))):
        remap = {old: new for new, old in enumerate(order)}
        samples = [Sample(s.key, remap[s.cls], s.ext, s.ref) for s in samples]
        classes = sorted(classes)
    return Source("cifar10", split, classes, samples, encode, lambda s: len(encode(s)))


def load_tiny_imagenet(src: Path, split: str) -> Source:
    wnids_file = src / "wnids.txt"
    if wnids_file.is_file():
        classes = sorted({line.strip() for line in wnids_file.read_text().splitlines() if line.strip()})
    else:
        classes = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    index = {wnid: i for i, wnid in enumerate(classes)}
    samples = []
    if split == "train":
        empty = []
        for wnid in classes:
            images = _images_under(src / "train" / wnid / "images") if (src / "train" / wnid).is_dir() else []
            if not images:
                empty.append(wnid)
            samples += [Sample(_key(p.relative_to(src)), index[wnid], IMAGE_EXTS[p.suffix.lower()], p) for p in images]
        if empty:
            raise click.ClickException(f"{src}/train: no images for {len(empty)} class(es) "
                                       f"({', '.join(empty[:5])}); expected train/<wnid>/images/*.JPEG")
        return _file_source("tiny-imagenet", split, classes, samples)
    annotations = src / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise click.ClickException(f"{annotations} is missing (Tiny-ImageNet val needs it for the labels)")
    labels = {}
    for n, line in enumerate(annotations.read_text().splitlines(), 1):
        if line.strip():
            fields = line.split("\t") if "\t" in line else line.split()
            labels[fields[0]] = (fields[1] if len(fields) > 1 else "", f"{annotations.name}:{n}")
    return _labelled_folder("tiny-imagenet", split, src / "val" / "images", labels, classes, src)


def load_imagenet_val(src: Path, labels_file: Path, classes_file: Path | None) -> Source:
    classes = _read_classes(classes_file) if classes_file else None
    labels = {}
    for n, line in enumerate(labels_file.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise click.ClickException(f"{labels_file}:{n}: expected '<filename> <class name or index>', got {line!r}")
        labels[fields[0]] = (fields[1], f"{labels_file.name}:{n}")
    values = [v for v, _ in labels.values()]
    if values and all(v.isdigit() for v in values):
        if classes is None:
            raise click.ClickException(f"{labels_file} gives class indices: pass --classes (the train pack's "
                                       "classes.json) so they can be named")
        labels = {name: (classes[int(v)] if int(v) < len(classes) else v, where) for name, (v, where) in labels.items()}
    if classes is None:
        classes = sorted(set(values))
    return _labelled_folder("imagenet-val", "val", src, labels, classes, src)


def _read_classes(path: Path) -> list[str]:
    text = path.read_text()
    try:
        names = json.loads(text)
    except ValueError:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise click.ClickException(f"{path}: expected a JSON list of class names or one name a line")
    return names


def _labelled_folder(fmt: str, split: str, folder: Path, labels: dict[str, tuple[str, str]], classes: list[str],
                     root: Path) -> Source:
    """A flat folder of images whose labels come from a file: every image labelled, every label an image."""
    if not folder.is_dir():
        raise click.ClickException(f"{folder} is not a folder of images")
    index = {name: i for i, name in enumerate(classes)}
    images = {p.name: p for p in folder.iterdir() if _is_image(p)}
    unlabelled = sorted(set(images) - set(labels))
    missing = sorted(set(labels) - set(images))
    unknown = sorted(f"{where} ({cls!r})" for cls, where in labels.values() if cls not in index)
    for problem, names in (("images have no label", unlabelled), ("labelled files are not in the folder", missing),
                           ("labels name an unknown class", unknown)):
        if names:
            raise click.ClickException(f"labels do not match {folder}: {len(names)} {problem}: "
                                       f"{', '.join(names[:5])}{', …' if len(names) > 5 else ''}")
    samples = [Sample(_key(p.relative_to(root)), index[labels[name][0]], IMAGE_EXTS[p.suffix.lower()], p)
               for name, p in sorted(images.items())]
    if not samples:
        raise click.ClickException(f"{folder}: no images")
    return _file_source(fmt, split, classes, samples)


def detect_format(src: Path, labels: Path | None) -> str:
    """The layout of SRC, from the files that mark each one."""
    if labels is not None:
        return "imagenet-val"
    cifar = _cifar_dir(src)
    if any(cifar.glob("data_batch_*")) or (cifar / "test_batch").is_file():
        return "cifar10"
    if (src / "train").is_dir() and ((src / "wnids.txt").is_file() or (src / "val" / "val_annotations.txt").is_file()):
        return "tiny-imagenet"
    if any(p.is_dir() and not p.name.startswith(".") and any(_is_image(f) for f in p.iterdir()) for p in src.iterdir()):
        return "imagefolder"
    raise click.ClickException(
        f"{src}: unknown dataset layout. Expected SRC/<class>/<image> (ImageFolder), CIFAR-10 batches "
        "(data_batch_1..5, test_batch), Tiny-ImageNet-200 (train/, val/, wnids.txt), or a flat folder of images "
        "with --labels FILE (ImageNet val); pass --format to say which")


def split_in_name(src: Path) -> str | None:
    """The split a folder's name says (``val``, ``imagenet-train``, ``ILSVRC2012_img_val``), if exactly one."""
    words = {SPLIT_WORDS[w] for w in re.split(r"[^a-z0-9]+", src.resolve().name.lower()) if w in SPLIT_WORDS}
    return words.pop() if len(words) == 1 else None


def default_prefix(src: Path, source: Source, split_given: bool) -> str:
    """The split, or for an ImageFolder whose name names none, the folder's own name made shard-safe."""
    if source.fmt != "imagefolder" or split_given or split_in_name(src):
        return source.split
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", src.resolve().name).strip("-._")
    return name or source.split


def load_source(src: Path, fmt: str, split: str | None, labels: Path | None, classes: Path | None) -> Source:
    if fmt == "auto":
        fmt = detect_format(src, labels)
    if fmt == "imagenet-val" and labels is None:
        raise click.UsageError("--format imagenet-val needs --labels FILE ('<filename> <class name or index>' lines)")
    split = split or (split_in_name(src) if fmt == "imagefolder" else None) or SPLITS[fmt][0]
    if split not in SPLITS[fmt]:
        raise click.UsageError(f"--split {split} does not apply to {fmt} (choose from {', '.join(SPLITS[fmt])})")
    if fmt == "imagefolder":
        return load_imagefolder(src, split)
    if fmt == "cifar10":
        return load_cifar10(src, split)
    if fmt == "tiny-imagenet":
        return load_tiny_imagenet(src, split)
    assert labels is not None
    return load_imagenet_val(src, labels, classes)


def shuffled_shards(samples: list[Sample], seed: int, shard_size: int) -> list[list[Sample]]:
    """Sort by key, shuffle with the seed, cut into shards: the same input always gives the same shards."""
    order = sorted(samples, key=lambda s: s.key)
    keys = [s.key for s in order]
    duplicates = {a for a, b in itertools.pairwise(keys) if a == b}
    if duplicates:
        raise click.ClickException(f"two images map to the same key: {', '.join(sorted(duplicates)[:5])}")
    random.Random(seed).shuffle(order)
    return [order[i:i + shard_size] for i in range(0, len(order), shard_size)]


def _members(shard: list[Sample], source: Source) -> Iterator[tuple[str, bytes]]:
    for s in shard:
        yield f"{s.key}.{s.ext}", source.read(s)
        yield f"{s.key}.cls", str(s.cls).encode()


def _tar_info(name: str, size: int) -> Any:
    import tarfile

    # fixed metadata: the same samples always give the same bytes
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "", ""
    return info


def expected_tar_size(shard: list[Sample], source: Source) -> int:
    """The exact size write_shard produces, from the member sizes alone (headers, 512-byte padding, end record)."""
    import tarfile

    total = 0
    for s in shard:
        for name, size in ((f"{s.key}.{s.ext}", source.size(s)), (f"{s.key}.cls", len(str(s.cls)))):
            header = _tar_info(name, size).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
            total += len(header) + -(-size // TAR_BLOCK) * TAR_BLOCK
    total += 2 * TAR_BLOCK
    return -(-total // TAR_RECORD) * TAR_RECORD


def write_shard(path: Path, shard: list[Sample], source: Source) -> None:
    import tarfile

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
        for name, data in _members(shard, source):
            tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))


def _write_shard_to(path: Path, shard: list[Sample], source: Source) -> None:
    write_shard(path, shard, source)


class LocalDest:
    """A local folder; shards are written under a temp name and renamed, so a final name is always whole."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def url(self, name: str) -> str:
        return str(self.root / name)

    def names(self) -> set[str]:
        return {p.name for p in self.root.iterdir() if p.is_file()}

    def read(self, name: str, limit: int | None = None) -> bytes | None:
        path = self.root / name
        if not path.is_file():
            return None
        with path.open("rb") as f:
            return f.read(-1 if limit is None else limit)

    def complete(self, name: str, size: Callable[[], int]) -> bool:
        path = self.root / name
        return path.is_file() and path.stat().st_size == size()

    def put(self, name: str, write: Callable[[Path], None]) -> None:
        partial = self.root / f".{name}.partial"
        write(partial)
        os.replace(partial, self.root / name)


class GcsDest:
    """``gs://bucket/prefix``: each shard is built in a local temp file and uploaded when it closes."""

    def __init__(self, url: str) -> None:
        from google.cloud import storage

        bucket, _, prefix = url.removeprefix("gs://").partition("/")
        if not bucket:
            raise click.UsageError(f"DEST {url!r}: expected gs://bucket/prefix")
        self.prefix = prefix.strip("/")
        self.bucket = storage.Client().bucket(bucket)
        self.existing = {b.name for b in self.bucket.client.list_blobs(bucket, prefix=self.prefix)}

    def _blob_name(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def url(self, name: str) -> str:
        return f"gs://{self.bucket.name}/{self._blob_name(name)}"

    def names(self) -> set[str]:
        start = f"{self.prefix}/" if self.prefix else ""
        return {n.removeprefix(start) for n in self.existing if n.startswith(start) and "/" not in n.removeprefix(start)}

    def read(self, name: str, limit: int | None = None) -> bytes | None:
        if self._blob_name(name) not in self.existing:
            return None
        blob = self.bucket.blob(self._blob_name(name))
        data: bytes = blob.download_as_bytes() if limit is None else blob.download_as_bytes(start=0, end=limit - 1)
        return data

    def complete(self, name: str, size: Callable[[], int]) -> bool:
        return self._blob_name(name) in self.existing  # uploads are atomic: an object that exists is whole

    def put(self, name: str, write: Callable[[Path], None]) -> None:
        with tempfile.TemporaryDirectory(prefix="hmctl-pack-") as tmp:
            path = Path(tmp) / name
            write(path)
            content_type = "application/x-tar" if name.endswith(".tar") else "application/json"
            self.bucket.blob(self._blob_name(name)).upload_from_filename(str(path), content_type=content_type)
        self.existing.add(self._blob_name(name))


def _write_bytes(data: bytes) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_bytes(data)
    return write


Dest = LocalDest | GcsDest
# manifest fields that must match for a rerun to resume, and how a message names them
IDENTITY = (("source", "source"), ("format", "format"), ("split", "split"), ("seed", "seed"),
            ("shard_size", "shard size"), ("fingerprint", "samples (images or labels)"))


def fingerprint(source: Source) -> str:
    """A digest of what decides the shards' content besides the seed: classes, keys, labels, extensions."""
    digest = hashlib.sha256(json.dumps(source.classes).encode())
    for s in sorted(source.samples, key=lambda s: s.key):
        digest.update(f"{s.key}\t{s.ext}\t{s.cls}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def new_manifest(src: Path, source: Source, prefix: str, seed: int, shard_size: int, names: list[str]) -> dict[str, Any]:
    return {"version": MANIFEST_VERSION, "tool": "hmctl dataset pack", "source": str(src.resolve()),
            "format": source.fmt, "split": source.split, "prefix": prefix, "seed": seed, "shard_size": shard_size,
            "samples": len(source.samples), "classes": len(source.classes), "fingerprint": fingerprint(source),
            "shards": names, "complete": False}


def _describe(m: dict[str, Any]) -> str:
    return (f"{m.get('source')} ({m.get('format')} {m.get('split')}, seed {m.get('seed')}, "
            f"{m.get('shard_size')} a shard, {m.get('samples')} samples)")


def _first_member(head: bytes | None) -> str | None:
    import tarfile

    if not head:
        return None
    try:
        with tarfile.open(fileobj=io.BytesIO(head), mode="r|") as tar:
            member = tar.next()
    except (tarfile.TarError, EOFError, OSError):
        return None
    return member.name if member else None


def check_classes(target: Dest, classes: list[str]) -> None:
    """classes.json is shared by every pack at DEST: a pack whose labels index another list is refused."""
    raw = target.read("classes.json")
    if raw is None:
        return
    try:
        existing = json.loads(raw)
    except ValueError:
        existing = None
    if existing != classes:
        def preview(names: Any) -> str:
            if not isinstance(names, list):
                return "not a list of class names"
            return f"{len(names)}: {', '.join(map(str, names[:4]))}{', …' if len(names) > 4 else ''}"
        raise click.ClickException(
            f"refusing to overwrite {target.url('classes.json')}: it lists other classes ({preview(existing)}) than "
            f"this pack ({preview(classes)}), and labels are positions in that list, so the packs at DEST would "
            "disagree on what a label means. Pack into another DEST.")


def check_prefix(target: Dest, manifest: dict[str, Any], shards: list[list[Sample]]) -> None:
    """Refuse unless every ``<prefix>-*.tar`` at DEST belongs to this very pack (so resuming cannot destroy data)."""
    prefix = manifest["prefix"]
    manifest_name = f"{prefix}.manifest.json"
    other = f" (e.g. --prefix {manifest['split']})" if manifest["split"] != prefix else ""
    todo = f"Pack into another DEST or --prefix NAME{other}; to replace those shards, delete {target.url(f'{prefix}-*.tar')}"
    raw = target.read(manifest_name)
    if raw is not None:
        try:
            old = json.loads(raw)
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            raise click.ClickException(f"{target.url(manifest_name)} is not a pack manifest ({exc}). "
                                       f"{todo} and {manifest_name} first.") from None
        differs = [label for key, label in IDENTITY if old.get(key) != manifest[key]]
        if differs:
            raise click.ClickException(
                f"refusing to overwrite the {prefix}-*.tar shards: {target.url(manifest_name)} says they were "
                f"packed from {_describe(old)}; this pack, {_describe(manifest)}, differs in {', '.join(differs)}. "
                f"{todo} and {manifest_name} first. To resume that pack, rerun it with its own source, --seed "
                "and --shard-size.")
        return
    # shards from before manifests: adopt only shards that start with the sample this pack puts there
    pattern = re.compile(rf"{re.escape(prefix)}-(\d{{6}})\.tar")
    for name in sorted(target.names()):
        match = pattern.fullmatch(name)
        if not match:
            continue
        i = int(match.group(1))
        first = _first_member(target.read(name, HEAD_BYTES))
        if i >= len(shards) or first != f"{shards[i][0].key}.{shards[i][0].ext}":
            raise click.ClickException(
                f"refusing to overwrite {target.url(name)}: it does not hold shard {i} of this pack "
                f"({_describe(manifest)}), and there is no {manifest_name} at DEST to say which pack wrote it. "
                f"{todo} first.")


def _check_prefix_option(value: str | None) -> str | None:
    if value is not None and not PREFIX_PATTERN.fullmatch(value):
        raise click.BadParameter(f"{value!r} is not a plain shard name (letters, digits, '.', '_', '-'; "
                                 "no '/', braces or leading dot)", param_hint="--prefix")
    return value


@click.command("pack")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("dest")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="auto", show_default=True,
              help="Layout of SRC (auto detects it).")
@click.option("--split", type=click.Choice(["train", "val", "test"]),
              help="Which split to pack: cifar10 train|test, tiny-imagenet train|val (SRC holds both); imagefolder "
                   "train|val|test only names the pack. [cifar10, tiny-imagenet: train; imagenet-val: val; "
                   "imagefolder: the split SRC's folder name says (val, imagenet-train, ILSVRC2012_img_val), "
                   "else train]")
@click.option("--labels", "labels_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="ImageNet val labels: '<filename> <class name or index>' a line.")
@click.option("--classes", "classes_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Class names for --labels (e.g. the train pack's classes.json); needed when labels are indices.")
@click.option("--prefix", callback=lambda ctx, param, value: _check_prefix_option(value),
              help="Shard names: <prefix>-000000.tar… and <prefix>.manifest.json. [the split; for an imagefolder "
                   "whose name names no split, the folder's name]")
@click.option("--shard-size", type=click.IntRange(1), default=2000, show_default=True, help="Samples a shard.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the global shuffle (keep it to resume).")
@click.option("--json", "json_output", is_flag=True, help="Print a JSON summary for scripts.")
def pack(src: Path, dest: str, fmt: str, split: str | None, labels_file: Path | None, classes_file: Path | None,
         prefix: str | None, shard_size: int, seed: int, json_output: bool) -> None:
    """Pack an image dataset at SRC into shuffled WebDataset shards at DEST (a folder or gs://bucket/prefix).

    \b
    Each sample holds the image's own bytes (jpg/png/…; CIFAR arrays as png), `cls` and `__key__`;
    classes.json lists the sorted class names (index = label). <prefix>.manifest.json records
    which pack wrote the shards (source, split, seed, shard size): rerunning the same pack skips
    the shards already at DEST, and a different one into the same prefix is refused, never
    written over (pack train and val into one DEST: they get their own prefixes).
    """
    source = load_source(src, fmt, split, labels_file, classes_file)
    prefix = prefix or default_prefix(src, source, split is not None)
    shards = shuffled_shards(source.samples, seed, shard_size)
    names = [f"{prefix}-{i:06d}.tar" for i in range(len(shards))]
    manifest = new_manifest(src, source, prefix, seed, shard_size, names)
    target: Dest = GcsDest(dest) if dest.startswith("gs://") else LocalDest(Path(dest))
    check_classes(target, source.classes)
    check_prefix(target, manifest, shards)
    classes_json = json.dumps(source.classes, indent=1).encode() + b"\n"
    if target.read("classes.json") != classes_json:
        target.put("classes.json", _write_bytes(classes_json))
    manifest_name = f"{prefix}.manifest.json"
    target.put(manifest_name, _write_bytes(json.dumps(manifest, indent=1).encode() + b"\n"))  # claim it first
    written = 0
    label = f"packing {source.fmt} {source.split} into {prefix}-*.tar"
    with click.progressbar(length=len(source.samples), label=label, file=sys.stderr) as bar:
        for name, shard in zip(names, shards, strict=True):
            if not target.complete(name, functools.partial(expected_tar_size, shard, source)):
                target.put(name, functools.partial(_write_shard_to, shard=shard, source=source))
                written += 1
            bar.update(len(shard))
    target.put(manifest_name, _write_bytes(json.dumps(manifest | {"complete": True}, indent=1).encode() + b"\n"))
    summary = {"dest": dest, "format": source.fmt, "split": source.split, "prefix": prefix,
               "manifest": target.url(manifest_name), "shards": len(shards), "written": written,
               "skipped": len(shards) - written, "samples": len(source.samples), "classes": len(source.classes)}
    if json_output:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"{summary['samples']} samples of {summary['classes']} classes in {len(shards)} shards at {dest} "
                   f"({written} written, {summary['skipped']} already there)")


@click.group("dataset")
def dataset() -> None:
    """Prepare training data (pack image datasets into WebDataset shards)."""


dataset.add_command(pack)
