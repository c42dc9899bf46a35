"""Run specs: what every peer of a run must agree on (model, data, optimizer, cadence).

A spec is written by a person as TOML (``examples/*.toml``) and published as JSON
(``<discovery>/runs/<run_id>/spec.json``). Both forms go through ``RunSpec.from_dict``,
which rejects unknown keys and bad values with a ``SpecError`` naming the key and,
for TOML, the line. Pure stdlib: hmctl imports this module.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

SPEC_VERSION = 1
_URL_SCHEMES = ("file://", "gs://", "https://", "http://", "demo://")


class SpecError(ValueError):
    """A run spec that cannot be used; the message names the key (and line) at fault."""


@dataclass(frozen=True)
class ModelSpec:
    arch: str = "resnet50"
    num_classes: int = 1000
    pretrained: str = ""  # optional local file of weights to start from; nothing is downloaded


@dataclass(frozen=True)
class DataSpec:
    train: str = ""
    val: str = ""
    train_samples: int = 0
    image_size: int = 224
    classes: str = ""  # optional classes.json (path or URL) naming string labels; index = position
    # training augmentation: "random-resized-crop" (ImageNet: RandomResizedCrop + flip), "crop-flip"
    # (CIFAR: pad by size/8, random crop, flip), "none" (resize only: digits, text, anything flip-sensitive)
    augment: str = "random-resized-crop"


@dataclass(frozen=True)
class OptimizerSpec:
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: tuple[float, ...] = (30, 60, 90)
    gamma: float = 0.1
    target_batch_size: int = 4096
    lr_scaling: str = "none"  # "linear": lr x target_batch_size / 256 (Goyal et al.)
    warmup_epochs: float = 0.0  # dataset epochs of linear warmup from ~0 to lr; 0 = none


@dataclass(frozen=True)
class AveragingSpec:
    strategy: str = "collaborative"  # or "gossip": local steps, parameters averaged in groups
    matchmaking_time: float = 5.0
    averaging_timeout: float = 60.0
    group_size: int = 16  # gossip: the largest averaging group
    min_group_size: int = 2  # gossip: fewer partners than this and the round is skipped
    alpha: float = 1.0  # gossip: weight of the group average (1.0 = replace by the average)
    average_every_steps: int = 10  # gossip: local steps between averaging rounds


@dataclass(frozen=True)
class CheckpointSpec:
    every_steps: int = 200


@dataclass(frozen=True)
class ValidationSpec:
    every_steps: int = 1000
    batches: int = 50


@dataclass(frozen=True)
class RunSection:
    max_epochs: float = 0.0  # dataset epochs after which the run ends (final.pt); 0 = no end


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
                raise SpecError(where.unknown(name, list(section_types), name))
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

        need(bool(re.fullmatch(r"[a-z][a-z0-9_]*", self.model.arch)), "model.arch",
             f"{self.model.arch!r} is not a torchvision model name (e.g. 'resnet50')")
        need(self.model.num_classes >= 2, "model.num_classes", "must be at least 2")
        for key, url in (("data.train", self.data.train), ("data.val", self.data.val)):
            need((key == "data.val" and url == "") or _is_url(url), key,
                 f"{url!r} is not a data location (a path, or a file://, gs://, https:// or demo:// URL)")
        need(self.data.classes == "" or _is_url(self.data.classes), "data.classes",
             f"{self.data.classes!r} is not a class list location (a path, or a file://, gs:// or https:// URL)")
        need(self.data.train_samples > 0, "data.train_samples", "must be the number of samples in one dataset epoch (> 0)")
        need(8 <= self.data.image_size <= 1024, "data.image_size", "must be between 8 and 1024 pixels")
        need(self.data.augment in ("random-resized-crop", "crop-flip", "none"), "data.augment",
             f"{self.data.augment!r} is not an augmentation (use 'random-resized-crop', 'crop-flip' or 'none')")
        need(self.optimizer.lr > 0, "optimizer.lr", "must be > 0")
        need(0 <= self.optimizer.momentum < 1, "optimizer.momentum", "must be in [0, 1)")
        need(self.optimizer.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
        need(list(self.optimizer.milestones) == sorted(self.optimizer.milestones)
             and all(m > 0 for m in self.optimizer.milestones),
             "optimizer.milestones", "must be increasing positive dataset epochs")
        need(0 < self.optimizer.gamma <= 1, "optimizer.gamma", "must be in (0, 1]")
        need(self.optimizer.target_batch_size > 0, "optimizer.target_batch_size", "must be > 0")
        need(self.optimizer.lr_scaling in ("none", "linear"), "optimizer.lr_scaling",
             f"{self.optimizer.lr_scaling!r} is not a scaling rule (use 'none' or 'linear')")
        need(self.optimizer.warmup_epochs >= 0, "optimizer.warmup_epochs", "must be >= 0 dataset epochs")
        need(self.averaging.strategy in ("collaborative", "gossip"), "averaging.strategy",
             f"{self.averaging.strategy!r} is not a strategy (use 'collaborative' or 'gossip')")
        need(self.averaging.group_size >= 2, "averaging.group_size", "must be at least 2 peers")
        need(1 <= self.averaging.min_group_size <= self.averaging.group_size, "averaging.min_group_size",
             f"must be between 1 and averaging.group_size ({self.averaging.group_size})")
        need(0 < self.averaging.alpha <= 1, "averaging.alpha", "must be in (0, 1] (1.0 = full average)")
        need(self.averaging.average_every_steps > 0, "averaging.average_every_steps", "must be > 0 local steps")
        need(self.run.max_epochs >= 0, "run.max_epochs", "must be >= 0 dataset epochs (0 = no end)")
        need(self.averaging.matchmaking_time > 0, "averaging.matchmaking_time", "must be > 0 seconds")
        need(self.averaging.averaging_timeout > 0, "averaging.averaging_timeout", "must be > 0 seconds")
        need(self.checkpoint.every_steps > 0, "checkpoint.every_steps", "must be > 0")
        need(self.validation.every_steps > 0, "validation.every_steps", "must be > 0")
        need(self.validation.batches >= 0, "validation.batches", "must be >= 0 (0 = the whole val set)")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["optimizer"]["milestones"] = list(self.optimizer.milestones)
        return {"version": SPEC_VERSION, **out}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def milestones_in_global_steps(self) -> list[int]:
        """MultiStepLR milestones in hivemind epochs (one per ``target_batch_size`` samples)."""
        steps_per_epoch = self.data.train_samples / self.optimizer.target_batch_size
        return [max(1, round(m * steps_per_epoch)) for m in self.optimizer.milestones]


def parse_toml(text: str, source: str = "spec.toml") -> RunSpec:
    """Parse a TOML run spec; errors name the file, the line and the key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{source}: not valid TOML: {exc}") from None
    return RunSpec.from_dict(raw, source=source, text=text)


def parse_json(text: str | bytes, source: str = "spec.json") -> RunSpec:
    """Parse a published spec.json."""
    try:
        raw = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SpecError(f"{source}: not valid JSON: {exc}") from None
    if isinstance(raw, dict) and raw.get("version", SPEC_VERSION) != SPEC_VERSION:
        raise SpecError(f"{source}: spec version {raw.get('version')!r} is not supported (expected {SPEC_VERSION})")
    return RunSpec.from_dict(raw, source=source)


_SECTION_CLASSES: dict[str, type] = {
    "model": ModelSpec,
    "data": DataSpec,
    "optimizer": OptimizerSpec,
    "averaging": AveragingSpec,
    "checkpoint": CheckpointSpec,
    "validation": ValidationSpec,
    "run": RunSection,
}


def _build_section(section_cls: type, section: str, raw: dict[str, Any], where: _Locator) -> Any:
    kwargs: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(section_cls)}
    for key, value in raw.items():
        dotted = f"{section}.{key}"
        if key not in fields:
            raise SpecError(where.unknown(key, list(fields), dotted, section))
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
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, tuple):
        if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return tuple(value)
        raise SpecError(where.at(key, f"{key}: expected a list of numbers, got {value!r}"))
    expected = type(default).__name__.replace("str", "string").replace("float", "number").replace("int", "integer")
    raise SpecError(where.at(key, f"{key}: expected {expected}, got {value!r}"))


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
        what = f"unknown key {dotted!r}" if section else f"unknown section [{key}]"
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
        return self.at(dotted, what + hint)
