"""Reading a dataset on disk as an index of samples: ImageFolder, CIFAR-10, Tiny-ImageNet-200, ImageNet val.

Each layout becomes one ``Source``: the sorted class names (index = label), the samples (key,
label, extension, where the bytes are) and how to read a sample's bytes. ``load_source`` picks
the layout (``detect_format`` when ``--format auto``) and the split; a layout that does not hold
together (empty classes, unlabelled images) is a ClickException that says what to fix.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp", ".gif": "gif",
              ".tif": "tiff", ".tiff": "tiff"}
FORMATS = ("auto", "imagefolder", "cifar10", "tiny-imagenet", "imagenet-val")
SPLITS = {"imagefolder": ("train", "val", "test"), "cifar10": ("train", "test"), "tiny-imagenet": ("train", "val"),
          "imagenet-val": ("val",)}
# an ImageFolder's split, from a word in its folder's name (imagenet/val, ILSVRC2012_img_train, …)
SPLIT_WORDS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}


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
