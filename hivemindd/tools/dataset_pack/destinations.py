"""Where the shards go: a local folder or ``gs://bucket/prefix``, both behind one small interface."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import click


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


def bytes_writer(data: bytes) -> Callable[[Path], None]:
    """A ``put`` callback that writes DATA (classes.json, the manifest)."""

    def write(path: Path) -> None:
        path.write_bytes(data)
    return write


Dest = LocalDest | GcsDest
