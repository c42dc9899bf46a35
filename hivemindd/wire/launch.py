"""What the supervisor hands a trainer process: one JSON file, read once at start.

This is the whole contract across the process boundary (plus JSON-line events
back on an inherited fd, see ``trainer/events.py``). Pure stdlib.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hivemindd.wire.spec import RunSpec


@dataclass(frozen=True)
class HostSettings:
    """This machine's own choices for a run: not shared with peers."""

    device: str = "auto"
    batch_size: int = 32
    workers: int = 0

    DEVICES = ("auto", "cuda", "mps", "cpu")

    def problems(self) -> list[tuple[str, str]]:
        """(field, message) for every bad value; empty when usable."""
        out = []
        if self.device not in self.DEVICES:
            out.append(("device", f"must be one of {', '.join(self.DEVICES)}, got {self.device!r}"))
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or not 1 <= self.batch_size <= 65536:
            out.append(("batch_size", f"must be an integer in 1..65536, got {self.batch_size!r}"))
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or not 0 <= self.workers <= 64:
            out.append(("workers", f"must be an integer in 0..64, got {self.workers!r}"))
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> HostSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


# Runs the trainer's own device choice in a fresh interpreter: the daemon imports no torch, and
# the refusal is the trainer's message word for word. Exit 2 (the trainer's config-error code): refused.
_DEVICE_PROBE = """
import sys
from hivemindd.trainer.errors import ConfigError
from hivemindd.trainer.model import select_device
try:
    select_device(sys.argv[1])
except ConfigError as exc:
    print(exc)
    sys.exit(2)
"""


@dataclass(frozen=True)
class DeviceCheck:
    """Whether this machine can train on a device: True, False (``message`` says why), or None (could not tell)."""

    usable: bool | None
    message: str = ""


async def check_device(device: str, timeout_s: float = 60.0) -> DeviceCheck:
    """Ask torch, in a subprocess, whether ``device`` exists here; ``auto`` and ``cpu`` always do.

    Seconds (torch's import) for ``cuda`` and ``mps`` only. A probe that times out or crashes
    decides nothing: the trainer then tries, and says what it finds.
    """
    if device not in ("cuda", "mps"):
        return DeviceCheck(True)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-P", "-c", _DEVICE_PROBE, device,  # -P: nothing from the current directory
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return DeviceCheck(None, f"the device check took longer than {timeout_s:.0f} s")
    except asyncio.CancelledError:
        proc.kill()
        await proc.wait()
        raise
    said = (out.decode(errors="replace").strip().splitlines() or [""])[-1]
    if proc.returncode == 0:
        return DeviceCheck(True)
    if proc.returncode == 2 and said:
        return DeviceCheck(False, said)
    tail = (err.decode(errors="replace").strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    return DeviceCheck(None, f"the device check failed: {tail}")


@dataclass(frozen=True)
class TrainerLaunch:
    """Everything one trainer process needs to know."""

    run_id: str
    spec: RunSpec
    host: HostSettings
    work_dir: str  # <state>/runs/<run_id>: checkpoints, identity
    cache_dir: str  # generated demo data and other caches
    initial_peers: tuple[str, ...]
    host_maddrs: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    announce_maddrs: tuple[str, ...] = ()
    # hivemind's progress records of a killed peer linger this long (see HIVEMIND_NOTES).
    metadata_expiration_s: float = 30.0
    # The host's rules for what the spec may make it read (trainer/read_policy.py): the operator's, not the spec's.
    state_dir: str = ""  # the daemon's state dir: never read for a spec (its cache excepted); "" = not known
    data_roots: tuple[str, ...] = ()  # [host] data_roots: local data only under these folders; () = unconfined
    allow_local_urls: bool = False  # [host] allow_local_urls: spec URLs may reach loopback/link-local hosts
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.work_dir) / "checkpoints"

    @property
    def identity_path(self) -> Path:
        return Path(self.work_dir) / "trainer.key"

    def to_json(self) -> str:
        raw = dataclasses.asdict(self)
        raw["spec"] = self.spec.to_dict()
        return json.dumps(raw, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TrainerLaunch:
        raw = json.loads(text)
        raw["spec"] = RunSpec.from_dict(raw["spec"], source="launch spec")
        raw["host"] = HostSettings.from_dict(raw["host"])
        for key in ("initial_peers", "host_maddrs", "announce_maddrs"):
            raw[key] = tuple(raw[key])
        raw["data_roots"] = tuple(raw.get("data_roots", ()))
        return cls(**raw)
