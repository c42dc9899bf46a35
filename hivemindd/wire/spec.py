"""Run specs: what every peer of a run must agree on (model, data, optimizer, cadence).

A spec is written by a person as TOML (``examples/*.toml``) and published as JSON
(``<discovery>/runs/<run_id>/spec.json``). Both forms go through ``RunSpec.from_dict``,
which rejects unknown keys and bad values with a ``SpecError`` naming the key and,
for TOML, the line. Pure stdlib: hmctl imports this module.

A spec comes from whoever can write the discovery store, so every key is bounded
(finite numbers in a range, strings without control characters and of limited
length, the whole text in bytes), and no data location may name ``/proc``,
``/sys`` or ``/dev``. What only the host can judge (its state directory, its
``data_roots``, loopback and link-local URLs) is checked where the trainer opens
the data. Each key's doc, unit and bounds live next to its default below;
``docs/spec.md`` is generated from them (``python -m hivemindd.wire.spec``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import posixpath
import re
import tomllib
import unicodedata
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

SPEC_VERSION = 1
_URL_SCHEMES = ("file://", "gs://", "https://", "http://", "demo://")
MAX_SPEC_BYTES = 64 * 1024  # a real spec is under 2 KB; a published spec.json over this is refused unread
MAX_STRING_CHARS = 2048  # longest string value (a data URL with a brace range is ~100)
MAX_MILESTONES = 100
# Local folders a spec may never name: the kernel's and devices' views (an endless /dev/zero, /proc/self/environ).
SYSTEM_DIRS = ("/proc", "/sys", "/dev")
LOCATION_KEYS = ("data.train", "data.val", "data.classes", "model.pretrained")


class SpecError(ValueError):
    """A run spec that cannot be used; the message names the key (and line) at fault."""


def _key(default: Any, doc: str, *, unit: str = "", lo: float | None = None, hi: float | None = None,
         lo_open: bool = False, hi_open: bool = False, choices: tuple[str, ...] = ()) -> Any:
    """A spec key: its default, what it means, its unit and its allowed range (the reference is made from these)."""
    return field(default=default, metadata={"doc": doc, "unit": unit, "lo": lo, "hi": hi, "lo_open": lo_open,
                                            "hi_open": hi_open, "choices": choices})


@dataclass(frozen=True)
class ModelSpec:
    arch: str = _key("resnet50", "torchvision model name (`resnet50`, `resnet18`, `shufflenet_v2_x0_5` …; "
                     "`resnet18_cifar` for 32 px images)")
    num_classes: int = _key(1000, "classes the final layer predicts", unit="classes", lo=2, hi=100_000)
    pretrained: str = _key("", "optional local file of weights to start from (a state dict, or a checkpoint holding "
                           "one); nothing is ever downloaded")


@dataclass(frozen=True)
class DataSpec:
    train: str = _key("", "**required.** training shards: a path, `file://`, `gs://`, `https://` URL with "
                      "`{000000..000640}` brace ranges, `demo://shapes/train`, or a folder tree ending in `/`")
    val: str = _key("", "validation shards (same forms as `train`, no folder trees); empty = no validation, "
                    "no `best.pt`")
    train_samples: int = _key(0, "**required.** samples in one dataset epoch (the unit of `milestones`, "
                              "`warmup_epochs` and `max_epochs`)", unit="samples", lo=1, hi=10**11)
    image_size: int = _key(224, "side of the square images the model sees", unit="pixels", lo=8, hi=1024)
    classes: str = _key("", "optional `classes.json` (path or URL): a JSON list of class names, index = position; "
                        "needed when `cls` entries are names, and gives predict its labels")
    augment: str = _key("random-resized-crop", "training augmentation: `random-resized-crop` (ImageNet: "
                        "RandomResizedCrop + flip), `crop-flip` (CIFAR: pad by size/8, random crop, flip), `none` "
                        "(resize only: digits, text, anything flip-sensitive)",
                        choices=("random-resized-crop", "crop-flip", "none"))


@dataclass(frozen=True)
class OptimizerSpec:
    lr: float = _key(0.1, "base learning rate of SGD (before `lr_scaling`)", lo=0, hi=100, lo_open=True)
    momentum: float = _key(0.9, "SGD momentum", lo=0, hi=1, hi_open=True)
    weight_decay: float = _key(1e-4, "SGD weight decay", lo=0, hi=1)
    milestones: tuple[float, ...] = _key((30, 60, 90), "MultiStepLR: the learning rate is multiplied by `gamma` "
                                         "at each (increasing) milestone", unit="dataset epochs", lo=0, hi=100_000,
                                         lo_open=True)
    gamma: float = _key(0.1, "factor applied to the learning rate at each milestone", lo=0, hi=1, lo_open=True)
    target_batch_size: int = _key(4096, "samples, summed over all peers, per global optimizer step (one hivemind "
                                  "epoch)", unit="samples", lo=1, hi=2**24)
    lr_scaling: str = _key("none", "`linear`: lr × target_batch_size / 256 (Goyal et al.); `none`: lr as given",
                           choices=("none", "linear"))
    warmup_epochs: float = _key(0.0, "linear warmup from ~0 to lr; 0 = none", unit="dataset epochs", lo=0,
                                hi=100_000)


@dataclass(frozen=True)
class AveragingSpec:
    strategy: str = _key("collaborative", "`collaborative` (hivemind.Optimizer, large-batch SGD) or `gossip` "
                         "(local steps, parameters averaged in groups)", choices=("collaborative", "gossip"))
    matchmaking_time: float = _key(5.0, "how long peers gather for an averaging round", unit="seconds", lo=0,
                                   hi=600, lo_open=True)
    averaging_timeout: float = _key(60.0, "how long an averaging round may take before it is given up (a stop can "
                                    "wait this long twice)", unit="seconds", lo=0, hi=3600, lo_open=True)
    group_size: int = _key(16, "gossip: the largest averaging group", unit="peers", lo=2, hi=1024)
    min_group_size: int = _key(2, "gossip: fewer partners than this and the round is skipped (at most "
                               "`group_size`)", unit="peers", lo=1, hi=1024)
    alpha: float = _key(1.0, "gossip: weight of the group average (1.0 = replace by the average)", lo=0, hi=1,
                        lo_open=True)
    average_every_steps: int = _key(10, "gossip: local steps between averaging rounds", unit="local steps", lo=1,
                                    hi=1_000_000)


@dataclass(frozen=True)
class CheckpointSpec:
    every_steps: int = _key(200, "write `latest.pt` every this many local steps", unit="local steps", lo=1,
                            hi=10**9)


@dataclass(frozen=True)
class ValidationSpec:
    every_steps: int = _key(1000, "validate every this many local steps (needs `data.val`)", unit="local steps",
                            lo=1, hi=10**9)
    batches: int = _key(50, "batches per validation; 0 = the whole val set", unit="batches", lo=0, hi=10**7)


@dataclass(frozen=True)
class RunSection:
    max_epochs: float = _key(0.0, "the run ends after this many dataset epochs: the trainer writes `final.pt` and "
                             "stops. 0 = no end. To stop at the end of the LR schedule, set it to the last "
                             "milestone (e.g. 90)", unit="dataset epochs", lo=0, hi=100_000)


@dataclass(frozen=True)
class RunSpec:
    """The whole recipe of a run; identical on every peer."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    averaging: AveragingSpec = field(default_factory=AveragingSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    validation: ValidationSpec = field(default_factory=ValidationSpec)
    run: RunSection = field(default_factory=RunSection)

    @classmethod
    def from_dict(cls, raw: Any, source: str = "spec", text: str | None = None) -> RunSpec:
        """Validate a parsed spec; ``text`` (the TOML source) lets errors give line numbers."""
        where = _Locator(source, text)
        if not isinstance(raw, dict):
            raise SpecError(f"{source}: a run spec must be a table of sections, got {type(raw).__name__}")
        raw = {k: v for k, v in raw.items() if k != "version"}
        sections: dict[str, Any] = {}
        section_types = {f.name: f.type for f in dataclasses.fields(cls)}
        for name, value in raw.items():
            if name not in section_types:
                raise SpecError(where.unknown(str(name), list(section_types), str(name)))
            if not isinstance(value, dict):
                raise SpecError(where.at(name, f"[{name}] must be a table"))
            section_cls = _SECTION_CLASSES[name]
            sections[name] = _build_section(section_cls, name, value, where)
        spec = cls(**sections)
        spec._check(where)
        return spec

    def _check(self, where: _Locator) -> None:
        def need(ok: bool, key: str, message: str) -> None:
            if not ok:
                raise SpecError(where.at(key, f"{key}: {message}"))

        need(self.data.train != "", "data.train",
             "is required: the [data] section must say where the training shards are (a path, or a file://, gs://, "
             "https:// or demo:// URL)")
        need(self.data.train_samples > 0, "data.train_samples",
             "is required: the number of samples in one dataset epoch (> 0)")
        for section, key, value, meta in spec_keys(self):
            _check_bounds(value, meta, f"{section}.{key}", where)
        need(bool(re.fullmatch(r"[a-z][a-z0-9_]*", self.model.arch)), "model.arch",
             f"{self.model.arch!r} is not a torchvision model name (e.g. 'resnet50')")
        for key, url in (("data.train", self.data.train), ("data.val", self.data.val)):
            need((key == "data.val" and url == "") or _is_url(url), key,
                 f"{url!r} is not a data location (a path, or a file://, gs://, https:// or demo:// URL)")
        need(self.data.classes == "" or _is_url(self.data.classes), "data.classes",
             f"{self.data.classes!r} is not a class list location (a path, or a file://, gs:// or https:// URL)")
        for key, location in zip(LOCATION_KEYS, (self.data.train, self.data.val, self.data.classes,
                                                 self.model.pretrained), strict=True):
            system = system_dir_of(location)
            need(system is None, key, f"{location!r} is under {system}: a run spec may not read the host's "
                 f"{', '.join(SYSTEM_DIRS)}")
        need(list(self.optimizer.milestones) == sorted(self.optimizer.milestones), "optimizer.milestones",
             "must be increasing positive dataset epochs")
        need(self.averaging.min_group_size <= self.averaging.group_size, "averaging.min_group_size",
             f"must be between 1 and averaging.group_size ({self.averaging.group_size})")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["optimizer"]["milestones"] = list(self.optimizer.milestones)
        return {"version": SPEC_VERSION, **out}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    # Two clocks: a *global step* (hivemind's epoch) is one optimizer step of the whole swarm,
    # ``target_batch_size`` samples; a *dataset epoch* is ``train_samples`` samples, the unit of the
    # milestones and of ``max_epochs``. Every conversion between them is one of these methods.

    def dataset_epochs(self, global_steps: float) -> float:
        """Passes over the training set that ``global_steps`` swarm-wide optimizer steps make."""
        return global_steps * self.optimizer.target_batch_size / self.data.train_samples

    def global_steps(self, dataset_epochs: float) -> float:
        """Swarm-wide optimizer steps (possibly fractional) in ``dataset_epochs`` passes over the training set."""
        return dataset_epochs * self.data.train_samples / self.optimizer.target_batch_size

    def milestones_in_global_steps(self) -> list[int]:
        """MultiStepLR milestones in hivemind epochs (one per ``target_batch_size`` samples)."""
        return [max(1, round(self.global_steps(m))) for m in self.optimizer.milestones]


def parse_toml(text: str, source: str = "spec.toml") -> RunSpec:
    """Parse a TOML run spec; errors name the file, the line and the key."""
    _check_size(len(text.encode(errors="replace")), source)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{source}: not valid TOML: {exc}") from None
    except RecursionError:
        raise SpecError(f"{source}: nested too deeply to be a run spec") from None
    return RunSpec.from_dict(raw, source=source, text=text)


def parse_json(text: str | bytes, source: str = "spec.json") -> RunSpec:
    """Parse a published spec.json."""
    _check_size(len(text.encode(errors="replace")) if isinstance(text, str) else len(text), source)
    try:
        raw = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SpecError(f"{source}: not valid JSON: {exc}") from None
    except RecursionError:
        raise SpecError(f"{source}: nested too deeply to be a run spec") from None
    if isinstance(raw, dict) and raw.get("version", SPEC_VERSION) != SPEC_VERSION:
        raise SpecError(f"{source}: spec version {raw.get('version')!r} is not supported (expected {SPEC_VERSION})")
    return RunSpec.from_dict(raw, source=source)


def system_dir_of(location: str) -> str | None:
    """The one of SYSTEM_DIRS a local location (a path or file:// URL) lies under, else None."""
    if location.startswith("file://"):
        path = urlparse(location).path
    elif "://" in location or not location:
        return None
    else:
        path = location
    path = posixpath.normpath("/" + path.lstrip("/")) if path.startswith("/") else posixpath.normpath(path)
    for folder in SYSTEM_DIRS:
        if path == folder or path.startswith(folder + "/"):
            return folder
    return None


def _plain(text: str) -> str:
    """``text`` with control characters escaped, for error messages that quote a hostile key."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _control_char(text: str) -> str | None:
    """The first control, format (bidi) or unassigned-surrogate character of ``text``, if any."""
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            return ch
    return None


_SECTION_CLASSES: dict[str, type] = {
    "model": ModelSpec,
    "data": DataSpec,
    "optimizer": OptimizerSpec,
    "averaging": AveragingSpec,
    "checkpoint": CheckpointSpec,
    "validation": ValidationSpec,
    "run": RunSection,
}


def spec_keys(spec: RunSpec | None = None) -> list[tuple[str, str, Any, dict[str, Any]]]:
    """(section, key, value or default, metadata) for every key, in the order of the classes."""
    out = []
    for section, section_cls in _SECTION_CLASSES.items():
        values = getattr(spec, section) if spec is not None else section_cls()
        for f in dataclasses.fields(section_cls):
            out.append((section, f.name, getattr(values, f.name), dict(f.metadata)))
    return out


def _check_size(size: int, source: str) -> None:
    if size > MAX_SPEC_BYTES:
        raise SpecError(f"{source}: {size} bytes is too large for a run spec (at most {MAX_SPEC_BYTES})")


def _check_bounds(value: Any, meta: dict[str, Any], key: str, where: _Locator) -> None:
    if isinstance(value, str):
        if len(value) > MAX_STRING_CHARS:
            raise SpecError(where.at(key, f"{key}: {len(value)} characters is too long (at most {MAX_STRING_CHARS})"))
        bad = _control_char(value)
        if bad is not None:
            raise SpecError(where.at(key, f"{key}: contains the control character U+{ord(bad):04X}; "
                                          "a spec value must be plain text"))
        if meta["choices"] and value not in meta["choices"]:
            options = " or ".join(repr(c) for c in meta["choices"])
            raise SpecError(where.at(key, f"{key}: {value!r} is not allowed (use {options})"))
        return
    if isinstance(value, tuple):
        if len(value) > MAX_MILESTONES:
            raise SpecError(where.at(key, f"{key}: {len(value)} entries is too many (at most {MAX_MILESTONES})"))
        for item in value:
            _check_number(item, meta, key, where)
        return
    _check_number(value, meta, key, where)


def _check_number(value: float, meta: dict[str, Any], key: str, where: _Locator) -> None:
    lo, hi = meta["lo"], meta["hi"]
    if lo is None and hi is None:
        return
    low = "(" if meta["lo_open"] else "["
    high = ")" if meta["hi_open"] else "]"
    unit = f" {meta['unit']}" if meta["unit"] else ""
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(where.at(key, f"{key}: must be a finite number in {low}{plain_number(lo)}, "
                                      f"{plain_number(hi)}{high}{unit}, got {value}"))
    ok = (value > lo if meta["lo_open"] else value >= lo) and (value < hi if meta["hi_open"] else value <= hi)
    if not ok:
        if isinstance(value, int) and not meta["lo_open"] and not meta["hi_open"]:
            message = f"must be between {plain_number(lo)} and {plain_number(hi)}{unit}"
        else:
            message = f"must be in {low}{plain_number(lo)}, {plain_number(hi)}{high}{unit}"
        raise SpecError(where.at(key, f"{key}: {message}, got {_short(value)}"))


def plain_number(value: float) -> str:
    """A bound as a person would write it: 100000, 0.5, 1e-06."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "…"


def _build_section(section_cls: type, section: str, raw: dict[str, Any], where: _Locator) -> Any:
    kwargs: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(section_cls)}
    for key, value in raw.items():
        dotted = f"{section}.{key}"
        if key not in fields:
            raise SpecError(where.unknown(str(key), list(fields), dotted, section))
        default = getattr(section_cls(), key)
        kwargs[key] = _coerce(value, default, dotted, where)
    return section_cls(**kwargs)


def _coerce(value: Any, default: Any, key: str, where: _Locator) -> Any:
    """Check ``value`` against the type of the field's default (ints widen to floats)."""
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(default, float):
        if isinstance(value, (int, float)):
            try:
                return float(value)
            except OverflowError:
                raise SpecError(where.at(key, f"{key}: {_short(value)} is not a finite number")) from None
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, tuple):
        if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return tuple(value)
        raise SpecError(where.at(key, f"{key}: expected a list of numbers, got {_short(value)}"))
    expected = type(default).__name__.replace("str", "string").replace("float", "number").replace("int", "integer")
    raise SpecError(where.at(key, f"{key}: expected {expected}, got {_short(value)}"))


def _is_url(url: str) -> bool:
    return bool(url) and (url.startswith(_URL_SCHEMES) or "://" not in url)


class _Locator:
    """Turns a dotted key into ``source:line`` using the TOML text, when there is one."""

    def __init__(self, source: str, text: str | None) -> None:
        self.source = source
        self.lines = text.splitlines() if text is not None else None

    def line_of(self, dotted: str) -> int | None:
        if self.lines is None:
            return None
        parts = dotted.split(".")
        section, key = (parts[0], parts[-1]) if len(parts) > 1 else (None, parts[0])
        current: str | None = None
        for number, line in enumerate(self.lines, start=1):
            stripped = line.strip()
            header = re.fullmatch(r"\[\s*([A-Za-z0-9_.-]+)\s*\]", stripped.split("#", 1)[0].strip())
            if header:
                current = header.group(1)
                if section is None and current == key:
                    return number
                continue
            if (section is None or current == section) and re.match(rf"{re.escape(key)}\s*=", stripped):
                return number
        return None

    def at(self, dotted: str, message: str) -> str:
        line = self.line_of(dotted)
        return f"{self.source}:{line}: {message}" if line else f"{self.source}: {message}"

    def unknown(self, key: str, known: list[str], dotted: str, section: str | None = None) -> str:
        what = f"unknown key {_plain(dotted)!r}" if section else f"unknown section [{_plain(key)}]"
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
        return self.at(dotted, what + hint)

