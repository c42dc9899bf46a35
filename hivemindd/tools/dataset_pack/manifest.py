"""Which pack owns a prefix at DEST: ``<prefix>.manifest.json``, and the rules that refuse another pack.

A rerun of the same pack resumes; a pack that differs in source, format, split, seed, shard size or
samples is refused before a byte is written, as is one whose ``classes.json`` would disagree.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import click

from hivemindd.tools.dataset_pack.destinations import Dest
from hivemindd.tools.dataset_pack.sources import Sample, Source

MANIFEST_VERSION = 1
HEAD_BYTES = 64 * 1024  # enough for a shard's first tar header, even behind a pax header
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
