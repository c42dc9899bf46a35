"""``hmctl dataset pack``: the click command that ties sources, shards, manifest and destination together."""

from __future__ import annotations

import functools
import json
import re
import sys
from pathlib import Path

import click

from hivemindd.tools.dataset_pack.destinations import Dest, GcsDest, LocalDest, bytes_writer
from hivemindd.tools.dataset_pack.manifest import check_classes, check_prefix, new_manifest
from hivemindd.tools.dataset_pack.shards import expected_tar_size, shuffled_shards, write_shard_to
from hivemindd.tools.dataset_pack.sources import FORMATS, default_prefix, load_source

PREFIX_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # nothing a brace pattern or a path would split


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
        target.put("classes.json", bytes_writer(classes_json))
    manifest_name = f"{prefix}.manifest.json"
    target.put(manifest_name, bytes_writer(json.dumps(manifest, indent=1).encode() + b"\n"))  # claim it first
    written = 0
    label = f"packing {source.fmt} {source.split} into {prefix}-*.tar"
    with click.progressbar(length=len(source.samples), label=label, file=sys.stderr) as bar:
        for name, shard in zip(names, shards, strict=True):
            if not target.complete(name, functools.partial(expected_tar_size, shard, source)):
                target.put(name, functools.partial(write_shard_to, shard=shard, source=source))
                written += 1
            bar.update(len(shard))
    target.put(manifest_name, bytes_writer(json.dumps(manifest | {"complete": True}, indent=1).encode() + b"\n"))
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
