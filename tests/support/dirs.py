"""Short temp dirs under /tmp: p2pd's unix sockets and the daemon's own stay well under the 108-byte limit."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def short_dir(prefix: str = "hmt-") -> Iterator[Path]:
    """A fresh dir like /tmp/hmt-abc123, removed with everything in it on the way out."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
