"""Checkpoints that survive a SIGKILL at any instant.

``latest.pt`` is replaced only by a file that is already whole on disk: the new
checkpoint is written to a temp file in the same directory and fsynced, the old
``latest.pt`` becomes ``previous.pt``, the temp file becomes ``latest.pt``, and the
directory is fsynced. A crash at any point leaves at least one whole checkpoint,
and the loader falls back from ``latest.pt`` to ``previous.pt`` when the first is
missing, truncated or corrupt. Corruption is found by the CRC-32 that torch's zip
format stores for every record (``torch.load`` itself reads flipped bytes inside a
tensor without a word).

``best.pt`` (the checkpoint with the best val top-1 so far) and ``final.pt`` (the
end of a run) are hard links to the ``latest.pt`` of that moment, made under a temp
name and renamed into place: no second copy on disk, and never half a file, since
no checkpoint file is ever modified after its rename.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

LATEST = "latest.pt"
PREVIOUS = "previous.pt"
BEST = "best.pt"
FINAL = "final.pt"
FORMAT = 1
REQUIRED_KEYS = ("format", "model", "optimizer", "step", "samples", "epoch")
_TEMP_PREFIX = f".{LATEST}."
_TEMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What the loader found: the payload (None if nothing usable), its file, and why others were skipped."""

    payload: dict[str, Any] | None
    path: Path | None
    problems: list[str] = field(default_factory=list)


def save_checkpoint(directory: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as the new ``latest.pt``, keeping the old one as ``previous.pt``.

    A write the disk refuses raises that OSError (ENOSPC, EFBIG …) with no file changed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(directory)
    fd, tmp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX, dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            watched = _WriteWatch(f)
            try:
                torch.save({"format": FORMAT, **payload}, watched)
            except RuntimeError as exc:
                if watched.error is not None:  # torch reports a failed write as a RuntimeError ("unexpected pos")
                    raise watched.error from exc
                raise
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    latest = directory / LATEST
    if latest.exists():
        os.replace(latest, directory / PREVIOUS)
    # Between these two renames only previous.pt exists; the loader handles that.
    os.replace(tmp, latest)
    _fsync_dir(directory)
    return latest


class _WriteWatch:
    """A file wrapper that remembers the first OSError of a write (ENOSPC, EFBIG, EIO) for the caller."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return int(self._file.write(data))
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def keep_as(directory: Path, name: str) -> Path:
    """Make ``name`` (``best.pt``, ``final.pt``) the current ``latest.pt`` too, atomically."""
    latest, target = directory / LATEST, directory / name
    tmp = directory / f".{name}.{os.getpid()}{_TEMP_SUFFIX}"
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(latest, tmp)
        except OSError:  # a filesystem without hard links: copy, and make the copy durable
            shutil.copyfile(latest, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    return target


def load_latest(directory: Path) -> LoadedCheckpoint:
    """The newest whole checkpoint in ``directory``: ``latest.pt``, else ``previous.pt``."""
    problems: list[str] = []
    for name in (LATEST, PREVIOUS):
        path = directory / name
        if not path.exists():
            problems.append(f"{name}: missing")
            continue
        try:
            payload = _read(path)
        except Exception as exc:  # torch.load raises many types for a damaged file
            problems.append(f"{name}: unreadable ({_one_line(exc)})")
            log.warning("checkpoint %s is unusable: %s", path, _one_line(exc))
            continue
        if problems and problems != [f"{LATEST}: missing"]:
            log.warning("resuming from %s because %s", path, "; ".join(problems))
        return LoadedCheckpoint(payload, path, problems)
    return LoadedCheckpoint(None, None, problems)


def _read(path: Path) -> dict[str, Any]:
    _verify_zip(path)
    # weights_only: a checkpoint holds tensors, numbers and strings, never code.
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict):
        raise ValueError(f"expected a dict, got {type(payload).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    if payload["format"] != FORMAT:
        raise ValueError(f"format {payload['format']!r} is not {FORMAT}")
    return payload


def _verify_zip(path: Path) -> None:
    """Check every record's CRC-32; files saved in torch's legacy (non-zip) format are left to torch.load."""
    if not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
    if bad is not None:
        raise ValueError(f"checksum mismatch in {bad}")


def _remove_stale_temps(directory: Path) -> None:
    # Left by a trainer killed mid-write; only one trainer uses a work dir at a time.
    for stale in directory.glob(f".*{_TEMP_SUFFIX}"):
        stale.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
